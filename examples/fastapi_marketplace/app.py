"""An async FastAPI marketplace backend (seed 001's shape) on escrowd's HTTP API: the
async client for calls, signed webhooks for what happened.

Run: `ESCROWD_URL=... ESCROWD_API_KEY=... ESCROWD_WEBHOOK_SECRET=... uvicorn app:app`.
"""

from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

import config
from escrowd.client import (
    AsyncEscrowdClient,
    EscrowdError,
    EscrowEvent,
    Unauthorized,
    ValidationFailed,
    verify_webhook,
)
from models import Agent, Base, Job, WebhookReceipt

# What each escrow event means for a job here.
JOB_STATUS = {
    "escrow.funded": "funded",
    "escrow.released": "completed",
    "escrow.refunded": "refunded",
}


@asynccontextmanager
async def lifespan(app: FastAPI):
    engine = create_async_engine(config.DATABASE_URL)
    async with engine.begin() as connection:
        await connection.run_sync(Base.metadata.create_all)
    app.state.sessions = async_sessionmaker(engine, expire_on_commit=False)
    async with AsyncEscrowdClient(config.ESCROWD_URL, config.ESCROWD_API_KEY) as escrowd:
        app.state.escrowd = escrowd
        yield
    await engine.dispose()


app = FastAPI(lifespan=lifespan)


@app.exception_handler(EscrowdError)
async def refused(_: Request, exc: EscrowdError) -> JSONResponse:
    # escrowd's typed errors keep their meaning: InsufficientFunds 422, AgentNotFound 404...
    return JSONResponse({"error": exc.type, "message": exc.message}, exc.http_status)


class NewAgent(BaseModel):
    agent_id: str
    display_name: str


class NewJob(BaseModel):
    client_id: str
    seller_id: str
    price: str


@app.post("/agents", status_code=201)
async def create_agent(body: NewAgent, request: Request) -> dict[str, str]:
    await request.app.state.escrowd.register_agent(body.agent_id, body.display_name)
    async with request.app.state.sessions.begin() as session:
        await session.merge(Agent(agent_id=body.agent_id, display_name=body.display_name))
    address = await request.app.state.escrowd.create_deposit_address(body.agent_id, "solana")
    return {"agent_id": body.agent_id, "deposit_address": address.address}


@app.post("/jobs", status_code=201)
async def create_job(body: NewJob, request: Request) -> dict[str, str]:
    async with request.app.state.sessions.begin() as session:
        job = Job(client_id=body.client_id, seller_id=body.seller_id, price=body.price)
        session.add(job)
    # Keyed by the job: repeating this after a crash can never lock the price twice.
    await request.app.state.escrowd.fund_escrow(
        job_id=job.job_id,
        buyer=job.client_id,
        worker=job.seller_id,
        asset=config.ESCROW_ASSET,
        amount=job.price,
        idempotency_key=f"fund-{job.job_id}",
    )
    return {"job_id": job.job_id}


@app.post("/jobs/{job_id}/complete", status_code=202)
async def complete_job(job_id: str, request: Request) -> dict[str, str]:
    await request.app.state.escrowd.release_escrow(job_id, idempotency_key=f"release-{job_id}")
    return {"job_id": job_id}


@app.get("/jobs/{job_id}")
async def get_job(job_id: str, request: Request) -> dict[str, object]:
    async with request.app.state.sessions() as session:
        job = await session.get(Job, job_id)
    if job is None:
        raise HTTPException(404)
    return {"job_id": job_id, "status": job.status, "seller_paid": job.seller_paid_base_units}


@app.post("/webhooks/escrowd", status_code=204)
async def escrowd_webhook(request: Request) -> Response:
    try:
        event = verify_webhook(await request.body(), request.headers, config.ESCROWD_WEBHOOK_SECRET)
    except (Unauthorized, ValidationFailed):  # a bad signature or body: not from escrowd
        return Response(status_code=400)
    async with request.app.state.sessions.begin() as session:
        if event.id is None or await session.get(WebhookReceipt, event.id) is not None:
            return Response(status_code=204)
        session.add(WebhookReceipt(event_id=event.id, type=event.type))
        if isinstance(event, EscrowEvent) and event.type in JOB_STATUS:
            job = await session.get(Job, event.data.job_id)
            if job is not None:
                job.status = JOB_STATUS[event.type]
                job.seller_paid_base_units = event.data.worker_amount_base_units
    return Response(status_code=204)
