"""A Flask marketplace backend (seed 000's shape) that holds job prices in escrow with
escrowd in process: no HTTP hop, the same typed errors as escrowd's API.

Its own `models.py` and `config.py` sit next to escrowd, which installs only `escrowd`.
Run: `ESCROWD_DATABASE_URL=... flask --app app run` (escrowd's database migrated by
`escrowd migrate`, its daemon crediting deposits).
"""

from decimal import Decimal

from flask import Flask, abort, jsonify, request
from sqlalchemy import create_engine
from sqlalchemy.orm import Session, sessionmaker

import config
from escrowd.config.errors import EscrowdError, ValidationFailed
from escrowd.escrow import EscrowService
from models import Agent, Base, Job


def base_units(price: Decimal) -> int:
    """The job's price in the asset's base units (USDC has 6 decimals); never a float."""
    scaled = price.scaleb(config.ESCROW_ASSET_DECIMALS)
    if scaled != scaled.to_integral_value():
        raise ValidationFailed(f"price {price} has more decimals than {config.ESCROW_ASSET}")
    return int(scaled)


def create_app() -> Flask:
    app = Flask(__name__)
    db = create_engine(config.DATABASE_URL)
    Base.metadata.create_all(db)
    sessions = sessionmaker(db, expire_on_commit=False)
    escrows = EscrowService.from_url(config.ESCROWD_DATABASE_URL)

    @app.errorhandler(EscrowdError)
    def refused(exc: EscrowdError):  # InsufficientFunds -> 422, EscrowConflict -> 409, ...
        return jsonify(error=exc.type, message=exc.message), exc.http_status

    def job_of(session: Session, task_id: str) -> Job:
        return session.get(Job, task_id) or abort(404)

    @app.post("/agents")
    def create_agent():
        body = request.get_json()
        escrows.register_agent(body["agent_id"], body["name"])
        with sessions.begin() as session:
            session.merge(Agent(agent_id=body["agent_id"], name=body["name"]))
        return jsonify(agent_id=body["agent_id"]), 201

    @app.get("/agents/<agent_id>/balance")
    def balance(agent_id: str):
        return jsonify({b.asset: b.available_base_units for b in escrows.balances(agent_id)})

    @app.post("/jobs")
    def create_job():
        body = request.get_json()
        job = Job(
            title=body["title"],
            price=Decimal(body["price"]),
            buyer_id=body["buyer_id"],
            winner_id=body["worker_id"],
        )
        base_units(job.price)
        with sessions.begin() as session:
            session.add(job)
        return jsonify(task_id=job.task_id, status="open"), 201

    @app.post("/jobs/<task_id>/fund")
    def fund(task_id: str):
        # The task id is the escrow's job id: funding a task twice is EscrowConflict.
        with sessions.begin() as session:
            job = job_of(session, task_id)
            escrow = escrows.fund_escrow(
                job_id=job.task_id,
                buyer=job.buyer_id,
                worker=job.winner_id,
                asset=config.ESCROW_ASSET,
                amount=base_units(job.price),
            )
            job.status = escrow.status
        return jsonify(task_id=task_id, status=job.status)

    @app.post("/jobs/<task_id>/accept")
    def accept(task_id: str):
        with sessions.begin() as session:
            job = job_of(session, task_id)
            escrow = escrows.release_escrow(job.task_id)
            job.status = "resolved"
        return jsonify(task_id=task_id, status=job.status, paid=escrow.worker_amount_base_units)

    @app.post("/jobs/<task_id>/cancel")
    def cancel(task_id: str):
        with sessions.begin() as session:
            job = job_of(session, task_id)
            escrow = escrows.refund_escrow(job.task_id)
            job.status = "cancelled"
        return jsonify(task_id=task_id, status=job.status, refunded=escrow.refund_amount_base_units)

    return app
