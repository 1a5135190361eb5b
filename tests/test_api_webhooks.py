"""Webhook payloads as a receiver sees them (issue #20 item 2 and the Standard Webhooks
signature): every event type is described in /openapi.json with an example, the events
the real code paths write match those descriptions key for key and name nothing by an
internal row id, and a delivery verifies with the `standardwebhooks` package."""

from __future__ import annotations

import base64
import json
import secrets
from collections import defaultdict
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import standardwebhooks
from fastapi.testclient import TestClient
from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from web3.types import Wei

from escrowd.config.settings import WebhookSettings
from escrowd.daemon.api import create_app
from escrowd.daemon.api_webhooks import EVENT_MODELS, EVENTS
from escrowd.escrow import payouts, service, subscriptions
from escrowd.escrow.deposits import LedgerDepositSink
from escrowd.escrow.events import API_VERSION, EVENT_TYPES, emit
from escrowd.escrow.payout_worker import EvmPayoutChain, PayoutWorker, WorkerOptions
from escrowd.escrow.payouts import PlatformAddresses, request_payout
from escrowd.escrow.unsupported import UnsupportedDepositRecorder
from escrowd.escrow.uow import in_transaction
from escrowd.escrow.webhook_delivery import deliver_due, run_webhooks
from escrowd.escrow.webhooks import (
    SECRET_PREFIX,
    SecretCipher,
    create_endpoint,
    rotate_secret,
    verify_webhook,
)
from escrowd.indexer.evm_sender import EvmSender
from escrowd.models import (
    Agent,
    Deposit,
    DepositAddress,
    Payout,
    PayoutReason,
    UnsupportedDeposit,
    WebhookEndpoint,
    WebhookEvent,
    utcnow,
)
from escrowd.models.db import make_engine, make_session_factory
from escrowd.models.registry import ensure_asset
from escrowd.wallets.keystore import create_keystore
from escrowd.wallets.secrets import Secret
from tests.escrow_fixtures import credit, make_settings
from tests.evm_fixtures import EvmChain
from tests.evm_indexer_helpers import CHAIN, make_poller, watch

CIPHER = SecretCipher(bytes(range(32)))


def test_every_event_type_is_described_with_an_example(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path), make_engine("sqlite://"), webhook_cipher=CIPHER)
    spec = TestClient(app).get("/openapi.json").json()
    assert spec["openapi"].startswith("3.1")
    assert set(spec["webhooks"]) == EVENT_TYPES
    for event_type, item in spec["webhooks"].items():
        body = item["post"]["requestBody"]["content"]["application/json"]
        component = spec["components"]["schemas"][body["schema"]["$ref"].rsplit("/", 1)[1]]
        assert component["properties"]["type"]["const"] == event_type
        assert component["properties"]["api_version"]["const"] == API_VERSION
        example = body["examples"]["example"]["value"]
        assert (example["type"], example["api_version"]) == (event_type, API_VERSION)
        EVENT_MODELS[event_type].model_validate(example)
        headers = {p["name"] for p in item["post"]["parameters"] if p["in"] == "header"}
        assert {"webhook-id", "webhook-timestamp", "webhook-signature"} <= headers
        assert "Escrowd-Signature" in headers
    assert API_VERSION in spec["info"]["description"]


def _check_payload(payload: dict[str, Any]) -> None:
    """The payload validates against its documented model and has exactly its keys."""
    model = EVENT_MODELS[payload["type"]]
    model.model_validate(payload)
    data_model: type[BaseModel] = EVENTS[payload["type"]][0]
    assert set(payload) == {"type", "api_version", "data"}
    assert set(payload["data"]) == set(data_model.model_fields), payload["type"]


def _payloads(sessions: sessionmaker[Session]) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = defaultdict(list)
    with sessions() as s:
        for event in s.scalars(select(WebhookEvent).order_by(WebhookEvent.id)):
            payload = json.loads(event.payload)
            assert (payload["type"], payload["api_version"]) == (event.type, event.api_version)
            found[event.type].append(payload)
    return found


@pytest.fixture
def chain_world(
    eth_tester_chain: EvmChain, sqlite_url: str, tmp_path: Path
) -> tuple[EvmChain, sessionmaker[Session], Any]:
    engine = make_engine(sqlite_url)
    sessions = make_session_factory(engine)
    keystore = create_keystore(tmp_path / "keystore.json", Secret("pass"), scrypt_log2_n=10)
    chain = eth_tester_chain
    chain.w3.eth.send_transaction(
        {"from": chain.accounts[0], "to": keystore.evm_hot_wallet.address, "value": Wei(10**18)}
    )
    with sessions() as s, s.begin():
        ensure_asset(s, chain=CHAIN, symbol="USDC", decimals=6, token_address=chain.token.address)
    return chain, sessions, keystore


def test_events_written_by_the_real_code_paths_match_their_descriptions(
    chain_world: tuple[EvmChain, sessionmaker[Session], Any],
) -> None:
    chain, sessions, keystore = chain_world
    # Deposits: seen and credited by the EVM poller, then one orphaned.
    agent_id, address = watch(sessions)
    chain.token.transfer(chain.accounts[1], address, 7_000_000)
    chain.token.transfer(chain.accounts[1], address, 1_000_000)
    poller = make_poller(chain, sessions, confirmations=1)
    assert poller.poll_once().deposits_found == 2
    chain.source.mine_blocks(1)  # type: ignore[union-attr]
    assert poller.confirm_once().confirmed == 2
    with sessions() as s, s.begin():
        orphan = s.scalars(select(Deposit).where(Deposit.amount == 1_000_000)).one()
        LedgerDepositSink().orphaned(s, orphan)
        external = s.get_one(Agent, agent_id).external_id

    # Escrows: every state change.
    with sessions() as s, s.begin():
        buyer = s.get_one(Agent, agent_id)
        worker = service.register_agent(s, "worker-1")
        fund = {"buyer": buyer, "worker": worker, "asset": "USDC", "amount": 1_000_000}
        for job in ("released", "refunded", "resolved"):
            service.fund_escrow(s, job_id=job, fee_bps=250, **fund)  # type: ignore[arg-type]
        service.fund_escrow(
            s,
            job_id="expired",
            fee_bps=250,
            expires_at=utcnow() + timedelta(seconds=1),
            **fund,  # type: ignore[arg-type]
        )
        service.release_escrow(s, "released")
        service.refund_escrow(s, "refunded")
        service.resolve_escrow(s, "resolved", 400_000)
        service.expire_due_escrows(s, utcnow() + timedelta(seconds=2))

    # Payouts: one confirmed on chain; one the hot wallet cannot cover waits for funds and
    # is cancelled; one parked by an operator, retried, then reverted on chain.
    hot = keystore.evm_hot_wallet.address
    chain.token.mint(hot, 3_000_000)
    platform = PlatformAddresses.of_keystore(keystore, None)
    with sessions() as s, s.begin():
        credit(s, agent_id, 6_000_000)
        payout_ids = [
            request_payout(
                s,
                chain=CHAIN,
                family="evm",
                asset_symbol="USDC",
                agent_id=agent_id,
                destination=chain.accounts[2 + n],
                amount=amount,
                reason=PayoutReason.WITHDRAWAL,
                reference=f"agent:{external}",
                idempotency_key=f"payout-{n}",
                min_amount_base_units=1,
                platform=platform,
            ).id
            for n, amount in enumerate((3_000_000, 2_000_000))
        ]
    sender = EvmSender(
        chain.source,
        keystore.evm_hot_wallet,
        chain=CHAIN,
        chain_id=chain.source.chain_id(),
        max_fee_gwei=200,
        confirmations=1,
    )
    worker_run = PayoutWorker(sessions, EvmPayoutChain(sender), WorkerOptions(worker_id="w"))
    stats = worker_run.run_until_idle(pause_s=0.0)
    assert stats.confirmed == 1
    with sessions() as s:
        # Mined in the same pass as the first one was confirmed: the float check must use
        # the balance after it, not the one read at the start of the pass.
        assert s.get_one(Payout, payout_ids[1]).status == "waiting_funds"
    _operator(
        sessions,
        payout_ids[1],
        lambda s, pid: payouts.cancel_payout(
            s, pid, operator="ops", reason="destination closed", evidence=None
        ),
    )
    with sessions() as s, s.begin():
        third = request_payout(
            s,
            chain=CHAIN,
            family="evm",
            asset_symbol="USDC",
            agent_id=agent_id,
            destination=chain.accounts[4],
            amount=1_000_000,
            reason=PayoutReason.WITHDRAWAL,
            reference=f"agent:{external}",
            idempotency_key="payout-3",
            min_amount_base_units=1,
            platform=platform,
        ).id
        payouts.park(s, s.get_one(Payout, third), reason="ValueError: test", actor="test")
    _operator(sessions, third, lambda s, pid: payouts.retry_payout(s, pid, operator="ops"))
    # The float check would hold it; without it the transfer reverts (the wallet is empty).
    reverting = PayoutWorker(sessions, _NoFloatCheck(sender), WorkerOptions(worker_id="w2"))
    assert reverting.run_until_idle(pause_s=0.0).failed == 1

    _subscription_events(sessions, agent_id)
    _unsupported_deposit_event(sessions, agent_id, address)

    found = _payloads(sessions)
    assert set(found) == EVENT_TYPES, sorted(EVENT_TYPES - set(found))
    for payloads in found.values():
        for payload in payloads:
            _check_payload(payload)
            data = payload["data"]
            # Agents by the marketplace's id, never by an internal row id.
            for key in ("agent", "buyer", "worker"):
                if key in data:
                    assert isinstance(data[key], str) and data[key] in (external, "worker-1")
            assert "agent_id" not in data and "escrow_id" not in data and "chain" not in data
    assert found["deposit.confirmed"][0]["data"]["network"] == CHAIN
    assert found["payout.confirmed"][0]["data"]["agent"] == external


class _NoFloatCheck(EvmPayoutChain):
    def shortfall(self, payout: Payout, asset: Any, ahead: Any) -> None:
        return None


def _operator(
    sessions: sessionmaker[Session], payout_id: int, action: Callable[[Session, int], object]
) -> None:
    with sessions() as s, s.begin():
        payouts.take_for_operator(s, payout_id, "ops", lease_s=30.0)
    with sessions() as s, s.begin():
        action(s, payout_id)


def _subscription_events(sessions: sessionmaker[Session], agent_id: int) -> None:
    """created and charged; charge_failed and paused (the balance spent); periods_skipped
    and resumed (a day later); canceled."""
    policy = subscriptions.ChargePolicy(max_charge_attempts=1)
    start = utcnow()
    with sessions() as s, s.begin():
        buyer = s.get_one(Agent, agent_id)
        request = subscriptions.NewSubscription(
            external_id="sub-1",
            buyer=buyer,
            worker=service.get_agent(s, "worker-1"),
            asset="USDC",
            amount=1_000_000,
            interval="day",
            interval_count=1,
            fee_bps=250,
        )
        subscriptions.create_subscription(s, request, now=start, policy=policy)
        [spend] = [b.available for b in service.balances(s, buyer) if b.asset == "USDC"]
        service.fund_escrow(
            s,
            job_id="spend-all",
            buyer=buyer,
            worker=service.get_agent(s, "worker-1"),
            asset="USDC",
            amount=spend,
            fee_bps=0,
        )
    subscriptions.charge_due(sessions, start + timedelta(days=1, seconds=1), policy)
    with sessions() as s, s.begin():
        service.refund_escrow(s, "spend-all")
        subscriptions.resume_subscription(
            s, "sub-1", now=start + timedelta(days=3, seconds=1), policy=policy
        )
        subscriptions.cancel_subscription(s, "sub-1", now=start + timedelta(days=3, seconds=2))


def _unsupported_deposit_event(
    sessions: sessionmaker[Session], agent_id: int, address: str
) -> None:
    with sessions() as s, s.begin():
        row = UnsupportedDeposit(
            chain=CHAIN,
            agent_id=agent_id,
            deposit_address_id=s.scalars(
                select(DepositAddress.id).where(DepositAddress.address == address)
            ).one(),
            token_address="0x50c5725949A6F0c72E6C4a641F24049A917DB0Cb",
            from_address="0x3f5CE5FBFe3E9af3971dD833D26bA9b5C936f0bE",
            to_address=address,
            amount_base_units=str(5 * 10**18),
            tx_hash="0x" + "1d" * 32,
            log_index=0,
            block_number=7,
            block_hash="0x" + "2e" * 32,
        )
        s.add(row)
        s.flush()
        UnsupportedDepositRecorder().recorded(s, [row])


class _Captured:
    """An httpx transport that records the requests the delivery job sends."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return httpx.Response(self.statuses.pop(0) if self.statuses else 200)


def test_deliveries_verify_with_the_standard_webhooks_library(
    sqlite_url: str, tmp_path: Path
) -> None:
    sessions = make_session_factory(make_engine(sqlite_url))
    endpoint, secret = in_transaction(
        sessions, lambda s: create_endpoint(s, CIPHER, "https://receiver.example/hooks")
    )
    assert secret.startswith(SECRET_PREFIX) and len(base64.b64decode(secret[6:])) == 32
    in_transaction(sessions, lambda s: emit(s, "deposit.pending", {"deposit_id": 1}))
    captured = _Captured([500])
    client = httpx.Client(transport=httpx.MockTransport(captured))
    settings = WebhookSettings(max_attempts=3)
    run_webhooks(sessions, CIPHER, settings, client=client)
    deliver_due(sessions, CIPHER, settings, client=client, now=utcnow() + timedelta(seconds=20))
    first, retry = captured.requests
    # The same message id on every attempt: receivers de-duplicate on it.
    assert first.headers["webhook-id"] == retry.headers["webhook-id"]
    assert retry.headers["webhook-id"] == retry.headers["Escrowd-Event-Id"]
    assert first.headers["webhook-timestamp"] != retry.headers["webhook-timestamp"]

    body = retry.content
    parsed = standardwebhooks.Webhook(secret).verify(body, dict(retry.headers))
    assert parsed["type"] == "deposit.pending"
    verify_webhook(body, retry.headers["Escrowd-Signature"], secret)
    tampered = body.replace(b'"deposit_id":1', b'"deposit_id":2')
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        standardwebhooks.Webhook(secret).verify(tampered, dict(retry.headers))
    other = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        standardwebhooks.Webhook(other).verify(body, dict(retry.headers))

    # An endpoint whose secret predates the standard form (URL-safe base64, unpadded)
    # is signed with the bytes that secret encodes.
    legacy_raw = secrets.token_bytes(32) + b"\xfb\xff"  # forces - and _ into the text
    legacy = SECRET_PREFIX + base64.urlsafe_b64encode(legacy_raw).rstrip(b"=").decode()
    with sessions() as s, s.begin():
        row = s.get_one(WebhookEndpoint, endpoint.id)
        row.secret_ciphertext = CIPHER.encrypt(legacy, endpoint_id=endpoint.id)
    in_transaction(sessions, lambda s: emit(s, "deposit.pending", {"deposit_id": 2}))
    run_webhooks(sessions, CIPHER, settings, client=client)
    old = captured.requests[-1]
    standardwebhooks.Webhook(legacy_raw).verify(old.content, dict(old.headers))
    verify_webhook(old.content, old.headers["Escrowd-Signature"], legacy)

    rotated = in_transaction(sessions, lambda s: rotate_secret(s, CIPHER, endpoint.id))
    in_transaction(sessions, lambda s: emit(s, "deposit.pending", {"deposit_id": 3}))
    run_webhooks(sessions, CIPHER, settings, client=client)
    new = captured.requests[-1]
    assert standardwebhooks.Webhook(rotated).verify(new.content, dict(new.headers))
