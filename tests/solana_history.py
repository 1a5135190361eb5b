"""Deposits of every kind a Solana deposit address can receive, sent from outside with
solders, and what the chain itself (read over RPC) says each address received."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from solders.instruction import Instruction
from solders.keypair import Keypair
from solders.message import Message
from solders.pubkey import Pubkey
from solders.system_program import CreateAccountParams, TransferParams, create_account, transfer
from solders.transaction import VersionedTransaction
from spl.token.constants import TOKEN_PROGRAM_ID
from spl.token.instructions import (
    create_idempotent_associated_token_account,
    get_associated_token_address,
    initialize_account3,
    transfer_checked,
)
from spl.token.instructions import transfer as token_transfer
from spl.token.models import (
    InitializeAccount3Params,
    TransferCheckedParams,
)
from spl.token.models import (
    TransferParams as TokenTransferParams,
)
from sqlalchemy.orm import Session, sessionmaker

from escrowd.devnet.solana_rpc import SolanaSimulator
from escrowd.escrow import accounts, ledger
from escrowd.indexer.solana_source import SolanaSource
from escrowd.wallets.allocation import allocate_deposit_address, get_or_create_agent
from escrowd.wallets.hd import SolanaSeedDeriver
from escrowd.wallets.secrets import Secret

SOL = 10**9
USDC = 10**6
TOKEN_ACCOUNT_SIZE = 165


@dataclass
class Chain:
    """A simulator with a funded payer holding USDC, and a second 6-decimal mint."""

    sim: SolanaSimulator
    usdc: Pubkey
    fake: Pubkey
    payer: Keypair

    @classmethod
    def on(cls, sim: SolanaSimulator) -> Chain:
        usdc = sim.create_usdc_mint()
        fake = sim.create_mint(6)
        payer = Keypair()
        sim.airdrop(payer.pubkey(), 10_000 * SOL)
        sim.mint_to(usdc, payer.pubkey(), 10**6 * USDC)
        sim.mint_to(fake, payer.pubkey(), 10**6 * USDC)
        return cls(sim, usdc, fake, payer)

    def send(self, instructions: Sequence[Instruction], *signers: Keypair) -> str:
        message = Message.new_with_blockhash(
            list(instructions), self.payer.pubkey(), self.sim.latest_blockhash()
        )
        tx = VersionedTransaction(message, [self.payer, *signers])
        return str(self.sim.send_transaction(bytes(tx)))

    def sol(self, to: Pubkey, lamports: int) -> Instruction:
        return transfer(
            TransferParams(from_pubkey=self.payer.pubkey(), to_pubkey=to, lamports=lamports)
        )

    def usdc_checked(self, dest: Pubkey, amount: int, mint: Pubkey | None = None) -> Instruction:
        mint = mint or self.usdc
        return transfer_checked(
            TransferCheckedParams(
                program_id=TOKEN_PROGRAM_ID,
                source=get_associated_token_address(self.payer.pubkey(), mint),
                mint=mint,
                dest=dest,
                owner=self.payer.pubkey(),
                amount=amount,
                decimals=6,
            )
        )

    def ata(self, owner: Pubkey, mint: Pubkey | None = None) -> Pubkey:
        return get_associated_token_address(owner, mint or self.usdc)

    def create_ata(self, owner: Pubkey, mint: Pubkey | None = None) -> Instruction:
        return create_idempotent_associated_token_account(
            self.payer.pubkey(), owner, mint or self.usdc
        )

    def other_token_account(self, owner: Pubkey) -> Pubkey:
        """A USDC token account of `owner` that is not its ATA, initialised with
        InitializeAccount3, so the owner appears in no account list."""
        account = Keypair()
        rent = self.sim.chain.rent_exempt_minimum(TOKEN_ACCOUNT_SIZE)
        self.send(
            [
                create_account(
                    CreateAccountParams(
                        from_pubkey=self.payer.pubkey(),
                        to_pubkey=account.pubkey(),
                        lamports=rent,
                        space=TOKEN_ACCOUNT_SIZE,
                        owner=TOKEN_PROGRAM_ID,
                    )
                ),
                initialize_account3(
                    InitializeAccount3Params(
                        program_id=TOKEN_PROGRAM_ID,
                        account=account.pubkey(),
                        mint=self.usdc,
                        owner=owner,
                    )
                ),
            ],
            account,
        )
        return account.pubkey()


def add_agents(
    sessions: sessionmaker[Session], chain: Chain, names: Sequence[str]
) -> tuple[SolanaSeedDeriver, list[tuple[int, Keypair]]]:
    """Agents with deposit addresses from a fresh seed (addresses no test used before)."""
    deriver = SolanaSeedDeriver(Secret(os.urandom(64)), usdc_mint=str(chain.usdc))
    agents = []
    with sessions() as session, session.begin():
        for name in names:
            agent = get_or_create_agent(session, name)
            session.flush()
            row = allocate_deposit_address(session, agent.id, "solana", deriver)
            agents.append((agent.id, deriver.keypair(row.derivation_index)))
    return deriver, agents


def send_every_kind(chain: Chain, wallets: Sequence[Pubkey]) -> None:
    """Deposits of each kind to three wallets over several slots, and transactions that
    credit nothing (a fake "USDC", a failed transfer)."""
    a, b, c = wallets[:3]
    sim = chain.sim
    chain.send([chain.sol(a, 2 * SOL)])
    chain.send([chain.create_ata(a)])
    chain.send([chain.usdc_checked(chain.ata(a), 5 * USDC)])  # transfer_checked to an ATA
    sim.advance_slots(1)
    chain.send([chain.create_ata(b)])
    plain = token_transfer(
        TokenTransferParams(
            program_id=TOKEN_PROGRAM_ID,
            source=chain.ata(chain.payer.pubkey()),
            dest=chain.ata(b),
            owner=chain.payer.pubkey(),
            amount=3 * USDC,
        )
    )
    chain.send([plain])  # plain transfer: neither mint nor owner in the account list
    # Create-the-ATA-and-transfer in one transaction (the ATA program's CPIs).
    chain.send([chain.create_ata(c), chain.usdc_checked(chain.ata(c), 7 * USDC)])
    sim.advance_slots(2)
    other = chain.other_token_account(a)
    chain.send([chain.usdc_checked(other, 11 * USDC)])  # a token account that is not the ATA
    chain.send([chain.sol(a, SOL // 10), chain.sol(b, SOL // 5), chain.sol(c, SOL // 2)])
    sim.advance_slots(1)
    chain.send([chain.create_ata(b, chain.fake)])
    chain.send([chain.usdc_checked(chain.ata(b, chain.fake), 9 * USDC, chain.fake)])  # fake mint
    poor = Keypair()
    sim.airdrop(poor.pubkey(), SOL // 100)
    failing = transfer(TransferParams(from_pubkey=poor.pubkey(), to_pubkey=c, lamports=50 * SOL))
    message = Message.new_with_blockhash([failing], poor.pubkey(), sim.latest_blockhash())
    sim.send_transaction(bytes(VersionedTransaction(message, [poor])), skip_preflight=True)
    for i in range(3):  # more history on one token account than a page holds
        chain.send([chain.usdc_checked(chain.ata(a), (i + 1) * USDC)])
        sim.advance_slots(1)
    sim.advance_slots(2)


def chain_totals(source: SolanaSource, usdc: Pubkey, wallets: Sequence[Pubkey]) -> dict[str, int]:
    """What each wallet holds at the finalized slot, read over RPC: SOL, and USDC over
    every token account of the mint it owns (deposit addresses only ever receive here)."""
    totals = {}
    for i, wallet in enumerate(wallets):
        totals[f"{i}:SOL"] = source.get_balance(str(wallet), "finalized")
        totals[f"{i}:USDC"] = sum(
            account.amount_base_units
            for account in source.get_token_accounts_by_owner(str(wallet), str(usdc), "finalized")
        )
    return totals


def credited(sessions: sessionmaker[Session], agent_ids: Sequence[int]) -> dict[str, int]:
    with sessions() as session, session.begin():
        return {
            f"{i}:{asset}": ledger.balance(session, accounts.agent_available(session, agent, asset))
            for i, agent in enumerate(agent_ids)
            for asset in ("SOL", "USDC")
        }
