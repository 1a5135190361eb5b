"""escrowd.client against a running `escrowd dev` API (started once for this module):
escrows, deposits and networks, withdrawals paid out on the simulated Solana chain,
escrows funded from a named deposit, subscriptions, audit and webhook endpoints.
(tests/test_client_contract.py holds the client to /openapi.json without a server.)

The buyer is funded as a user would fund it: SOL airdropped to its Solana deposit
address, seen by the poller and credited. Faults come from a TCP proxy between the client
and the API: a dropped answer after the work was done, injected 5xx and 429 answers.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import socket
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from solders.keypair import Keypair

from escrowd.client import (
    AgentNotFound,
    AsyncEscrowdClient,
    ConnectionFailed,
    DepositEvent,
    DepositNotFound,
    DepositUsed,
    EscrowConflict,
    EscrowdClient,
    EscrowEvent,
    EscrowNotFound,
    IdempotencyConflict,
    InsufficientFunds,
    InvalidAmount,
    NotFound,
    OtherEvent,
    RateLimited,
    RetryPolicy,
    ServerError,
    SubscriptionConflict,
    SubscriptionNotFound,
    Unauthorized,
    UnknownNetwork,
    ValidationFailed,
    WebhookPayloadInvalid,
    WithdrawalNotFound,
    parse_event,
    verify_webhook,
)
from escrowd.escrow.events import API_VERSION
from escrowd.escrow.webhooks import (
    SignatureHeaderInvalid,
    SignatureMismatch,
    TimestampOutOfTolerance,
    signature_header,
)
from tests.dev_api import LAMPORTS_PER_SOL, DevApi, FaultProxy, running_dev_api, wait_for

FAST = RetryPolicy(max_attempts=4, backoff_base_s=0.05, backoff_max_s=0.2)
BUYER_SOL = 3


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevApi]:
    with running_dev_api(tmp_path_factory.mktemp("client") / "dev") as api:
        yield api


@pytest.fixture(scope="module")
def client(dev: DevApi) -> Iterator[EscrowdClient]:
    with EscrowdClient(dev.url, dev.api_key, retry=FAST) as escrowd:
        yield escrowd


@pytest.fixture(scope="module")
def parties(dev: DevApi, client: EscrowdClient) -> tuple[str, str]:
    """A buyer holding 3 SOL from two deposits, and a worker."""
    buyer, worker = f"buyer-{uuid.uuid4().hex[:6]}", f"worker-{uuid.uuid4().hex[:6]}"
    assert client.register_agent(buyer, "Buyer").id == buyer
    client.register_agent(worker)
    address = client.create_deposit_address(buyer, "solana")
    assert client.get_deposit_address(buyer, "solana") == address
    dev.airdrop(address.address, 2 * LAMPORTS_PER_SOL)
    dev.airdrop(address.address, 1 * LAMPORTS_PER_SOL)
    wait_for(
        "both deposits credited",
        lambda: _available(client, buyer) == BUYER_SOL * LAMPORTS_PER_SOL,
    )
    return buyer, worker


def _available(client: EscrowdClient, agent: str) -> int:
    found = {b.asset: b for b in client.balances(agent)}
    return found["SOL"].available_base_units if "SOL" in found else 0


def _job() -> str:
    return f"job-{uuid.uuid4().hex[:10]}"


def test_escrow_lifecycle_values_and_typed_errors(
    client: EscrowdClient, parties: tuple[str, str]
) -> None:
    buyer, worker = parties
    before = _available(client, buyer)
    job = _job()

    funded = client.fund_escrow(
        job_id=job, buyer=buyer, worker=worker, asset="SOL", amount="0.5", fee_bps=200
    )

    assert (funded.status, funded.buyer, funded.worker) == ("funded", buyer, worker)
    assert funded.amount_base_units == LAMPORTS_PER_SOL // 2
    assert funded.created_at.utcoffset() is not None
    assert client.get_escrow(job) == funded
    [sol] = [b for b in client.balances(buyer) if b.asset == "SOL"]
    assert (sol.decimals, sol.available_base_units) == (9, before - LAMPORTS_PER_SOL // 2)
    assert sol.escrowed_as_buyer_base_units == LAMPORTS_PER_SOL // 2

    released = client.release_escrow(job)

    assert released.status == "released"
    assert released.fee_amount_base_units == 10_000_000  # 2 % of 0.5 SOL
    assert released.worker_amount_base_units == 490_000_000
    assert _available(client, worker) == 490_000_000
    with pytest.raises(EscrowConflict, match="already released"):
        client.refund_escrow(job)
    with pytest.raises(EscrowNotFound):
        client.get_escrow("no-such-job")
    with pytest.raises(AgentNotFound):
        client.fund_escrow(job_id=_job(), buyer="nobody", worker=worker, asset="SOL", amount="1")
    with pytest.raises(InsufficientFunds) as short:
        client.fund_escrow(job_id=_job(), buyer=buyer, worker=worker, asset="SOL", amount="100")
    assert short.value.http_status == 422
    with pytest.raises(InvalidAmount, match="decimal places"):
        client.fund_escrow(
            job_id=_job(), buyer=buyer, worker=worker, asset="SOL", amount="0.0000000001"
        )
    with pytest.raises(NotFound):
        client.get_agent("nobody")
    # A bare number is refused before anything is sent: 12 USDC or 12 base units?
    with pytest.raises(InvalidAmount, match="decimal string"):
        client.fund_escrow(job_id=_job(), buyer=buyer, worker=worker, asset="SOL", amount=1)  # type: ignore[arg-type]
    assert _available(client, buyer) == before - LAMPORTS_PER_SOL // 2


def test_resolve_refund_and_idempotency_keys(
    client: EscrowdClient, parties: tuple[str, str]
) -> None:
    buyer, worker = parties
    before = _available(client, buyer)
    job, key = _job(), f"fund-{uuid.uuid4().hex}"

    first = client.fund_escrow(
        job_id=job,
        buyer=buyer,
        worker=worker,
        asset="SOL",
        amount=Decimal("0.2"),
        idempotency_key=key,
    )
    again = client.fund_escrow(
        job_id=job,
        buyer=buyer,
        worker=worker,
        asset="SOL",
        amount=Decimal("0.2"),
        idempotency_key=key,
    )
    assert again == first
    with pytest.raises(IdempotencyConflict):
        client.fund_escrow(
            job_id=_job(),
            buyer=buyer,
            worker=worker,
            asset="SOL",
            amount="0.2",
            idempotency_key=key,
        )
    assert _available(client, buyer) == before - 200_000_000

    resolved = client.resolve_escrow(job, "0.1")
    assert (resolved.status, resolved.refund_amount_base_units) == ("resolved", 100_000_000)
    refund_job = _job()
    client.fund_escrow(job_id=refund_job, buyer=buyer, worker=worker, asset="SOL", amount="0.1")
    assert client.refund_escrow(refund_job).refund_amount_base_units == 100_000_000
    assert _available(client, buyer) == before - 100_000_000


def test_paginated_lists_and_audit(client: EscrowdClient, parties: tuple[str, str]) -> None:
    buyer, _ = parties
    deposits = list(client.iter_deposits(agent=buyer, page_size=1))
    assert [d.amount_base_units for d in deposits] == [2 * LAMPORTS_PER_SOL, LAMPORTS_PER_SOL]
    assert all(d.agent == buyer and d.asset == "SOL" and d.credited for d in deposits)
    first_page = client.list_deposits(agent=buyer, limit=1)
    assert first_page.items == (deposits[0],) and first_page.next_cursor is not None

    job = _job()
    client.fund_escrow(job_id=job, buyer=buyer, worker=parties[1], asset="SOL", amount="0.01")
    client.release_escrow(job)
    rows = list(client.iter_audit(escrow=job, page_size=2))
    assert [row.seq for row in rows] == list(range(1, len(rows) + 1))
    actions = [row.action for row in rows]
    assert actions.index("escrow_funded") < actions.index("escrow_released")
    assert all(row.stream == f"escrow:{job}" for row in rows)
    report = client.verify_audit()
    assert report.ok and report.rows_checked >= len(rows)


def test_webhook_endpoint_operations(dev: DevApi, client: EscrowdClient) -> None:
    created = client.create_webhook_endpoint("http://127.0.0.1:9/hooks", ["escrow.released"])
    assert created.secret is not None and created.secret.startswith("whsec_")
    assert created.event_types == ("escrow.released",)
    listed = {e.id: e for e in client.list_webhook_endpoints()}
    assert listed[created.id].secret is None and listed[created.id].enabled
    rotated = client.rotate_webhook_secret(created.id)
    assert rotated is not None and rotated != created.secret
    assert list(client.iter_webhook_deliveries(endpoint_id=created.id, page_size=5)) == []
    with pytest.raises(ValidationFailed):
        client.create_webhook_endpoint("ftp://example.com/hooks")
    assert client.delete_webhook_endpoint(created.id).id == created.id
    with pytest.raises(NotFound):
        client.redeliver_webhook(10**12)
    with (
        EscrowdClient(dev.url, "esk_nope_nope", retry=FAST) as stranger,
        pytest.raises(Unauthorized),
    ):
        stranger.get_agent("anyone")


def test_networks_deposit_addresses_and_deposits_name_networks(
    client: EscrowdClient, parties: tuple[str, str]
) -> None:
    buyer, _ = parties
    networks = {n.network: n for n in client.list_networks()}
    # `escrowd dev` names its one EVM chain after its family.
    assert {name: n.chain_family for name, n in networks.items()} == {
        "evm": "evm",
        "solana": "solana",
    }
    sol = {a.asset: a for a in networks["solana"].assets}["SOL"]
    assert (sol.decimals, sol.token_address) == (9, None)
    assert networks["evm"].chain_id is not None and networks["evm"].confirmations == 3
    assert networks["solana"].confirmations is None

    address = client.get_deposit_address(buyer, "solana")
    assert (address.chain_family, address.networks) == ("solana", ("solana",))
    evm = client.create_deposit_address(buyer, "evm")
    assert evm.address.startswith("0x") and evm.networks == ("evm",)
    deposits = list(client.iter_deposits(agent=buyer, network="solana"))
    assert [(d.network, d.chain_family, d.credit_state) for d in deposits] == [
        ("solana", "solana", "credited")
    ] * 2
    assert [d.credited_base_units for d in deposits] == [2 * LAMPORTS_PER_SOL, LAMPORTS_PER_SOL]
    assert list(client.iter_deposits(agent=buyer, network="evm")) == []
    with pytest.raises(UnknownNetwork, match="configured networks"):
        client.list_deposits(network="base")


def test_withdrawal_is_held_then_paid_and_read_back(
    client: EscrowdClient, parties: tuple[str, str]
) -> None:
    buyer, _ = parties
    before = {b.asset: b for b in client.balances(buyer)}["SOL"]
    destination = str(Keypair().pubkey())

    held = client.withdraw(
        agent=buyer, asset="SOL", network="solana", to_address=destination, amount="0.05"
    )

    assert (held.network, held.chain, held.chain_family) == ("solana", "solana", "solana")
    assert (held.agent, held.destination, held.reason) == (buyer, destination, "withdrawal")
    assert held.amount_base_units == 50_000_000
    sol = {b.asset: b for b in client.balances(buyer)}["SOL"]
    assert sol.available_base_units == before.available_base_units - 50_000_000
    wait_for(
        "the payout confirmed",
        lambda: client.get_withdrawal(held.id).status == "confirmed",
        timeout_s=20,
    )
    paid = client.get_withdrawal(held.id)
    assert paid.tx_hash is not None and paid.confirmed_at is not None
    assert paid.block_number is not None and paid.confirmations is None  # Solana: finalized
    assert (paid.id, paid.amount_base_units, paid.created_at) == (
        held.id,
        held.amount_base_units,
        held.created_at,
    )
    after = {b.asset: b for b in client.balances(buyer)}["SOL"]
    assert after.pending_withdrawals_base_units == 0
    assert after.available_base_units == before.available_base_units - 50_000_000
    listed = list(client.iter_withdrawals(agent=buyer, network="solana", page_size=1))
    assert paid in listed
    assert client.list_withdrawals(status="confirmed", limit=50).items.count(paid) == 1
    with pytest.raises(WithdrawalNotFound):
        client.get_withdrawal(10**12)


def test_escrow_funded_from_a_named_deposit(
    client: EscrowdClient, parties: tuple[str, str]
) -> None:
    buyer, worker = parties
    one_sol = client.list_deposits(agent=buyer).items[1]
    assert one_sol.amount_base_units == LAMPORTS_PER_SOL
    before = _available(client, buyer)
    job = _job()

    escrow = client.fund_escrow_from_deposit(
        job_id=job,
        worker=worker,
        network=one_sol.network,
        tx_hash=one_sol.tx_hash,
        log_index=one_sol.log_index,
        buyer=buyer,
        amount="0.1",
    )

    assert (escrow.status, escrow.buyer, escrow.amount_base_units) == ("funded", buyer, 10**8)
    source = escrow.funded_from_deposit
    assert source is not None and source.deposit_id == one_sol.id
    assert (source.network, source.tx_hash) == ("solana", one_sol.tx_hash)
    assert source.depositor_address is not None
    assert client.get_escrow(job) == escrow
    assert _available(client, buyer) == before - 10**8
    with pytest.raises(DepositUsed):
        client.fund_escrow_from_deposit(
            job_id=_job(), worker=worker, network="solana", tx_hash=one_sol.tx_hash
        )
    with pytest.raises(DepositNotFound):
        client.fund_escrow_from_deposit(
            job_id=_job(), worker=worker, network="solana", tx_hash="1111111111"
        )
    assert client.refund_escrow(job).funded_from_deposit == source
    assert _available(client, buyer) == before


def test_subscription_operations(client: EscrowdClient, parties: tuple[str, str]) -> None:
    buyer, worker = parties
    before = _available(client, buyer)
    monthly = f"sub-{uuid.uuid4().hex[:8]}"

    created = client.create_subscription(
        subscription_id=monthly,
        buyer=buyer,
        worker=worker,
        asset="SOL",
        amount="0.01",
        interval="month",
    )

    # Starting now charges the first period at once: 0.01 SOL, 2.5 % of it the fee.
    assert (created.status, created.next_period_index, created.amount_base_units) == (
        "active",
        1,
        10_000_000,
    )
    [charge] = client.iter_subscription_charges(monthly, page_size=1)  # next cursor: 0
    assert (charge.period_index, charge.status, charge.attempts) == (0, "succeeded", 1)
    assert (charge.payee_amount_base_units, charge.fee_amount_base_units) == (9_750_000, 250_000)
    assert _available(client, buyer) == before - 10_000_000
    assert client.get_subscription(monthly) == created
    assert created in client.iter_subscriptions(buyer=buyer, status="active", page_size=1)
    with pytest.raises(SubscriptionConflict):
        client.resume_subscription(monthly)  # only a paused one resumes
    canceled = client.cancel_subscription(monthly, requested_by="buyer")
    assert (canceled.status, canceled.canceled_by, canceled.next_charge_at) == (
        "canceled",
        "buyer",
        None,
    )

    later = f"sub-{uuid.uuid4().hex[:8]}"
    starts = datetime.now(UTC).replace(microsecond=0) + timedelta(days=2)
    weekly = client.create_subscription(
        subscription_id=later,
        buyer=buyer,
        asset="SOL",
        amount="0.02",
        interval="week",
        interval_count=2,
        starts_at=starts,
    )
    assert (weekly.worker, weekly.fee_bps, weekly.next_charge_at) == (None, 0, starts)
    assert client.list_subscription_charges(later).items == ()
    assert client.cancel_subscription(later).canceled_by == "marketplace"
    assert _available(client, buyer) == before - 10_000_000
    with pytest.raises(InsufficientFunds):
        client.create_subscription(
            subscription_id=_job(), buyer=buyer, asset="SOL", amount="1000", interval="day"
        )
    with pytest.raises(SubscriptionNotFound):
        client.get_subscription("no-such-subscription")


# --- retries through the fault proxy ------------------------------------------------------


@pytest.fixture
def proxy(dev: DevApi) -> Iterator[FaultProxy]:
    host, port = dev.url.removeprefix("http://").split(":")
    relay = FaultProxy((host, int(port)))
    yield relay
    relay.close()


def test_retry_after_a_dropped_answer_funds_once(
    dev: DevApi, client: EscrowdClient, parties: tuple[str, str], proxy: FaultProxy
) -> None:
    buyer, worker = parties
    before = _available(client, buyer)
    job = _job()
    proxy.faults = ["drop"]

    with EscrowdClient(proxy.url, dev.api_key, retry=FAST) as flaky:
        funded = flaky.fund_escrow(
            job_id=job, buyer=buyer, worker=worker, asset="SOL", amount="0.25"
        )

    # escrowd did the work on the first try, the answer was lost, the retry (same key) got
    # the stored answer: one escrow, one debit, one escrow_funded audit row.
    tries = [s for s in proxy.seen if s.request_line.startswith("POST /v1/escrows ")]
    assert [t.action for t in tries] == ["drop", "pass"]
    assert tries[0].idempotency_key is not None
    assert tries[1].idempotency_key == tries[0].idempotency_key
    assert tries[1].replayed
    assert funded.status == "funded" and funded.amount_base_units == 250_000_000
    assert _available(client, buyer) == before - 250_000_000
    actions = [row.action for row in client.iter_audit(escrow=job)]
    assert actions.count("escrow_funded") == 1


def test_5xx_and_429_are_retried_honoring_retry_after(
    dev: DevApi, parties: tuple[str, str], proxy: FaultProxy
) -> None:
    buyer, _ = parties
    proxy.faults = ["503", "reset", "429:1"]
    with EscrowdClient(proxy.url, dev.api_key, retry=FAST) as flaky:
        started = time.monotonic()
        agent = flaky.get_agent(buyer)
        elapsed_s = time.monotonic() - started
    assert agent.id == buyer
    assert [s.action for s in proxy.seen] == ["503", "reset", "429:1", "pass"]
    assert elapsed_s >= 1.0  # the 429's Retry-After: 1


def test_retries_end_in_typed_errors(dev: DevApi, proxy: FaultProxy) -> None:
    with EscrowdClient(proxy.url, dev.api_key, retry=FAST) as flaky:
        proxy.faults = ["502"] * FAST.max_attempts
        with pytest.raises(ServerError) as server:
            flaky.get_agent("anyone")
        assert server.value.http_status == 502
        proxy.faults = ["reset"] * FAST.max_attempts
        with pytest.raises(ConnectionFailed, match="same idempotency_key"):
            flaky.register_agent("never-registered")
        keys = {s.idempotency_key for s in proxy.seen if s.action == "reset"}
        assert len(keys) == 1
        # A wait longer than the policy allows is not waited: the 429 is final.
        proxy.faults = ["429:3600"]
        with pytest.raises(RateLimited):
            flaky.get_agent("anyone")
    assert len(proxy.seen) == 2 * FAST.max_attempts + 1
    with EscrowdClient(dev.url, dev.api_key) as direct, pytest.raises(NotFound):
        direct.get_agent("never-registered")


# --- the async client ---------------------------------------------------------------------


def test_async_client(dev: DevApi, parties: tuple[str, str]) -> None:
    buyer, worker = parties

    async def scenario() -> None:
        async with AsyncEscrowdClient(dev.url, dev.api_key, retry=FAST) as escrowd:
            job = _job()
            funded, agent = await asyncio.gather(
                escrowd.fund_escrow(
                    job_id=job, buyer=buyer, worker=worker, asset="SOL", amount="0.05"
                ),
                escrowd.get_agent(worker),
            )
            assert funded.status == "funded" and agent.id == worker
            refunded = await escrowd.refund_escrow(job)
            assert refunded.refund_amount_base_units == 50_000_000
            deposits = [d async for d in escrowd.iter_deposits(agent=buyer, page_size=1)]
            assert len(deposits) == 2
            with pytest.raises(EscrowConflict):
                await escrowd.release_escrow(job)
            networks = await escrowd.list_networks()
            assert sorted(n.network for n in networks) == ["evm", "solana"]
            subscriptions = [s async for s in escrowd.iter_subscriptions(page_size=1)]
            assert len({s.id for s in subscriptions}) == len(subscriptions)

    asyncio.run(scenario())


def test_sync_and_async_clients_offer_the_same_operations() -> None:
    def operations(cls: type) -> dict[str, list[str]]:
        return {
            name: list(inspect.signature(member).parameters)
            for name, member in vars(cls).items()
            if not name.startswith("_") and callable(member) and name not in ("close", "aclose")
        }

    assert operations(EscrowdClient) == operations(AsyncEscrowdClient)


# --- webhooks -----------------------------------------------------------------------------

SECRET = "whsec_test-secret"


def _delivery(body: dict[str, object], *, at: int | None = None) -> tuple[bytes, dict[str, str]]:
    payload = json.dumps(body).encode()
    stamp = int(time.time()) if at is None else at
    return payload, {
        "escrowd-signature": signature_header(payload, SECRET, stamp),
        "Escrowd-Event-Id": "42",
    }


ESCROW_EVENT = {
    "type": "escrow.released",
    "api_version": API_VERSION,
    "data": {
        "job_id": "job-1",
        "status": "released",
        "buyer": "b",
        "worker": "w",
        "asset": "USDC",
        "amount_base_units": "1000000",
        "fee_bps": 250,
        "worker_amount_base_units": "975000",
        "fee_amount_base_units": "25000",
        "refund_amount_base_units": "0",
    },
}


def test_verify_webhook_returns_typed_events() -> None:
    payload, headers = _delivery(ESCROW_EVENT)
    event = verify_webhook(payload, headers, SECRET)
    assert isinstance(event, EscrowEvent)
    assert (event.id, event.type, event.data.job_id) == ("42", "escrow.released", "job-1")
    assert event.data.worker_amount_base_units == 975_000

    deposit = {
        "type": "deposit.confirmed",
        "api_version": API_VERSION,
        "data": {
            "deposit_id": 3,
            "agent": "b",
            "network": "solana",
            "asset": "SOL",
            "amount_base_units": "2000000000",
            "tx_hash": "sig",
            "log_index": 1,
            "block_number": 9,
            "status": "confirmed",
        },
    }
    parsed = parse_event(json.dumps(deposit))
    assert isinstance(parsed, DepositEvent) and parsed.data.amount_base_units == 2 * 10**9
    other = parse_event(json.dumps({"type": "future.thing", "api_version": "x", "data": {"n": 1}}))
    assert isinstance(other, OtherEvent) and other.data == {"n": 1}


def test_verify_webhook_refusals() -> None:
    payload, headers = _delivery(ESCROW_EVENT)
    with pytest.raises(SignatureMismatch):
        verify_webhook(payload.replace(b"975000", b"999999"), headers, SECRET)
    with pytest.raises(SignatureMismatch):
        verify_webhook(payload, headers, "whsec_other")
    with pytest.raises(SignatureHeaderInvalid):
        verify_webhook(payload, {}, SECRET)
    stale, stale_headers = _delivery(ESCROW_EVENT, at=int(time.time()) - 3600)
    with pytest.raises(TimestampOutOfTolerance):
        verify_webhook(stale, stale_headers, SECRET)
    broken = {**ESCROW_EVENT, "data": {"job_id": "job-1"}}
    with pytest.raises(WebhookPayloadInvalid):
        verify_webhook(*_delivery(broken), SECRET)
    with pytest.raises(WebhookPayloadInvalid):
        parse_event(b"[1, 2]")


def test_an_unreachable_api_is_a_typed_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Bound and released: nothing listens there now.
    with (
        EscrowdClient(f"http://127.0.0.1:{port}", "esk_x_y", retry=FAST) as nowhere,
        pytest.raises(ConnectionFailed),
    ):
        nowhere.get_agent("anyone")
