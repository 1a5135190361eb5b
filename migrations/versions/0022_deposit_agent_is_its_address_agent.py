"""deposits: the agent of a deposit is the agent of its deposit address

Revision ID: 0022
Revises: 0021
Create Date: 2026-12-05

A deposit names its agent and its deposit address, each checked against its own table by a
foreign key, but nothing held the two to each other: a row crediting one agent for a
transfer into another agent's address was storable. One foreign key of the pair
(deposit_address_id, agent_id) onto a unique index of deposit_addresses replaces the two:
the address exists, its agent is the deposit's, and the agent exists through the
address's own foreign key.

It is also one foreign-key check per stored deposit instead of two: issue 18, a backfill
crediting 25,000 deposits on PostgreSQL, same database with one constraint set then the
other, 4 alternating pairs: process wall 3.25-3.39 s -> 3.10-3.19 s, PostgreSQL CPU
1.40-1.56 s -> 1.32-1.35 s.

Existing rows are checked first; the upgrade stops (`escrowd migrate` exits 1) naming the
deposits whose agent is not their address's (none can have been written by escrowd's
indexers, which take both from the same address row).
"""

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import sqlalchemy as sa
from alembic import op

from escrowd.config.errors import Conflict

revision: str = "0022"
down_revision: str | None = "0021"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ADDRESS_AGENT_INDEX = "uq_deposit_addresses_id_agent_id"
ADDRESS_FK = "fk_deposits_deposit_address_id_deposit_addresses"
AGENT_FK = "fk_deposits_agent_id_agents"
# As revision 0020 wrote it (the partial index's condition).
PENDING_DEPOSIT = "status = 'pending'"

_MISMATCHED = """
SELECT d.id, d.agent_id, a.agent_id FROM deposits d
JOIN deposit_addresses a ON a.id = d.deposit_address_id
WHERE a.agent_id <> d.agent_id ORDER BY d.id LIMIT 10
"""


def upgrade() -> None:
    wrong = op.get_bind().execute(sa.text(_MISMATCHED)).all()
    if wrong:
        listed = ", ".join(
            f"deposit {d} (agent {agent}, address of agent {owner})" for d, agent, owner in wrong
        )
        raise Conflict(
            f"deposits whose agent is not their deposit address's agent: {listed}; correct "
            "them before upgrading"
        )
    # An index, not a constraint: SQLite creates it in place (a new constraint would mean
    # copying deposit_addresses, which other tables reference).
    op.create_index(ADDRESS_AGENT_INDEX, "deposit_addresses", ["id", "agent_id"], unique=True)
    with _escrows_let_go(), op.batch_alter_table("deposits", schema=None) as batch_op:
        batch_op.drop_constraint(AGENT_FK, type_="foreignkey")
        batch_op.drop_constraint(ADDRESS_FK, type_="foreignkey")
        batch_op.create_foreign_key(
            ADDRESS_FK, "deposit_addresses", ["deposit_address_id", "agent_id"], ["id", "agent_id"]
        )
    _history_indexes_last()


def downgrade() -> None:
    with _escrows_let_go(), op.batch_alter_table("deposits", schema=None) as batch_op:
        batch_op.drop_constraint(ADDRESS_FK, type_="foreignkey")
        batch_op.create_foreign_key(ADDRESS_FK, "deposit_addresses", ["deposit_address_id"], ["id"])
        batch_op.create_foreign_key(AGENT_FK, "agents", ["agent_id"], ["id"])
    _history_indexes_last()
    op.drop_index(ADDRESS_AGENT_INDEX, table_name="deposit_addresses")


def _history_indexes_last() -> None:
    """SQLite: the rebuild creates the table's indexes in an order that varies from run to
    run, and SQLite settles a tie between two indexes a query can use by that order (an
    agent's pending deposits went through ix_deposits_agent_id_id, every deposit of the
    agent, in about half the runs). Revision 0020's two indexes are made again, last and
    in its order, as they were before the rebuild."""
    if op.get_bind().dialect.name != "sqlite":
        return
    op.drop_index("ix_deposits_pending_by_agent", table_name="deposits")
    op.drop_index("ix_deposits_status_id", table_name="deposits")
    op.create_index("ix_deposits_status_id", "deposits", ["status", "id"])
    op.create_index(
        "ix_deposits_pending_by_agent",
        "deposits",
        ["agent_id"],
        sqlite_where=sa.text(PENDING_DEPOSIT),
    )


@contextmanager
def _escrows_let_go() -> Iterator[None]:
    """SQLite rebuilds deposits (copy, drop, rename), and dropping it fails while an escrow
    refers to one of its rows (checked at once, or at commit when deferred): the escrows
    funded from deposits let go of them for the rebuild and take them back after it."""
    if op.get_bind().dialect.name != "sqlite":
        yield
        return
    op.execute(
        "CREATE TEMP TABLE escrow_deposits_0022 AS "
        "SELECT id, deposit_id FROM escrows WHERE deposit_id IS NOT NULL"
    )
    op.execute("UPDATE escrows SET deposit_id = NULL WHERE deposit_id IS NOT NULL")
    yield
    op.execute(
        "UPDATE escrows SET deposit_id = (SELECT t.deposit_id FROM escrow_deposits_0022 t "
        "WHERE t.id = escrows.id) WHERE id IN (SELECT id FROM escrow_deposits_0022)"
    )
    op.execute("DROP TABLE escrow_deposits_0022")
