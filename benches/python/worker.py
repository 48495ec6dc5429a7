"""The issue's reference point (issue 18, item 6): a competent batched Python worker doing
the daemon's job, for a side-by-side CPU figure on the same machine.

aio-pika consumes singles from a quorum queue (prefetch 2 x concurrency, as the daemon's
default), aiohttp calls the terminate route with at most `concurrency` calls in flight
(retrying 500s with backoff), and asyncpg commits one audit row per request in batched
statements (whatever queued during the previous commit, one INSERT ... SELECT FROM unnest);
once a request's row is committed its message is acked, runs of consecutive delivery tags
with one `multiple` ack, as the daemon does. It stops when it has recorded `--requests`
rows, prints its own CPU time (start-up and imports included) as JSON, deletes its queue,
and exits 1 unless every request succeeded (a run that is not correct has no rate).

    python worker.py fill --requests 20000        # publish the singles (not measured)
    python worker.py drop                         # delete the queue
    python worker.py work --requests 20000 --concurrency 64 --api http://127.0.0.1:PORT

AMQP_URL, DATABASE_URL and QUEUE come from the environment. benches/python/run.sh runs both
against the project's sandbox and then the daemon's own benchmark with the same numbers.
"""

import argparse
import asyncio
import json
import os
import resource
import time

import aio_pika
import aiohttp
import asyncpg

PROJECT_ID = "0123456789abcdef0123456789abcdef"
QUEUE_ARGS = {"x-queue-type": "quorum"}


async def fill(amqp_url, queue, n):
    conn = await aio_pika.connect(amqp_url)
    async with conn:
        ch = await conn.channel(publisher_confirms=True)
        await ch.declare_queue(queue, durable=True, arguments=QUEUE_ARGS)
        pending = []
        for i in range(n):
            body = json.dumps(
                {
                    "request_id": f"r-{i}",
                    "project_id": PROJECT_ID,
                    "workflow_id": "wf-bench",
                    "execution_id": f"ex-{i}",
                }
            ).encode()
            msg = aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
            pending.append(ch.default_exchange.publish(msg, routing_key=queue))
            if len(pending) >= 2048:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)


async def drop(amqp_url, queue):
    conn = await aio_pika.connect(amqp_url)
    async with conn:
        ch = await conn.channel()
        await ch.queue_delete(queue)


async def work(amqp_url, database_url, queue, api, n, concurrency, token):
    db = await asyncpg.connect(database_url)
    await db.execute(
        "CREATE TABLE IF NOT EXISTS py_audit (request_id text PRIMARY KEY, outcome text NOT NULL, "
        "http_status int, attempts int NOT NULL, latency_ms float8, received_at timestamptz NOT NULL, "
        "recorded_at timestamptz NOT NULL DEFAULT clock_timestamp())"
    )
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=concurrency), headers={"X-Auth-Token": token}
    )
    slots = asyncio.Semaphore(concurrency)
    queued = []  # (row, message) waiting for the next commit
    wake = asyncio.Event()
    recorded = 0

    async def call(req):
        url = (
            f"{api}/v1/{req['project_id']}/cms/workflow/{req['workflow_id']}"
            f"/executions/{req['execution_id']}/terminate"
        )
        delay = 0.2
        status, latency = None, None
        for attempt in range(1, 6):
            started = time.perf_counter()
            try:
                async with session.post(url, json={}) as resp:
                    await resp.read()
                    status = resp.status
            except (aiohttp.ClientError, asyncio.TimeoutError):
                status = None
            latency = (time.perf_counter() - started) * 1000
            if status is not None and status < 500:
                outcome = "succeeded" if status < 300 else "failed_permanent"
                return outcome, status, attempt, latency
            if attempt < 5:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10)
        return "failed_retries_exhausted", status, 5, latency

    async def handle(message):
        received = time.time()
        try:
            req = json.loads(message.body)
            request_id = str(req["request_id"])
        except (ValueError, KeyError, TypeError):
            row = (f"bad-{message.delivery_tag}", "rejected", None, 0, None, received)
        else:
            try:
                async with slots:
                    outcome, status, attempts, latency = await call(req)
            except Exception:  # recorded as failed, never lost
                outcome, status, attempts, latency = "failed_retries_exhausted", None, 0, None
            row = (request_id, outcome, status, attempts, latency, received)
        queued.append((row, message))
        wake.set()

    async def writer():
        # Delivery tags run 1, 2, 3, ... on the channel: `frontier` is the
        # first one not yet acked; a commit acks the run of consecutive
        # committed tags from it with one `multiple` ack.
        nonlocal recorded
        frontier = 1
        committed = {}
        while recorded < n:
            await wake.wait()
            wake.clear()
            batch = queued[:]
            queued.clear()
            if not batch:
                continue
            cols = list(zip(*(row for row, _ in batch)))
            await db.execute(
                "INSERT INTO py_audit (request_id, outcome, http_status, attempts, latency_ms, received_at) "
                "SELECT r, o, s, a, l, to_timestamp(t) FROM unnest($1::text[], $2::text[], "
                "$3::int[], $4::int[], $5::float8[], $6::float8[]) AS u(r, o, s, a, l, t) "
                "ON CONFLICT (request_id) DO NOTHING",
                *[list(c) for c in cols],
            )
            for _, message in batch:
                committed[message.delivery_tag] = message
            last = None
            while frontier in committed:
                last = committed.pop(frontier)
                frontier += 1
            if last is not None:
                await last.ack(multiple=True)
            recorded += len(batch)

    conn = await aio_pika.connect(amqp_url)
    ch = await conn.channel()
    await ch.set_qos(prefetch_count=2 * concurrency)
    q = await ch.declare_queue(queue, durable=True, arguments=QUEUE_ARGS)
    writing = asyncio.ensure_future(writer())
    # aio-pika runs each delivery's callback as a task of its own.
    tag = await q.consume(handle)
    # The writer's end, or its error: a run never hangs on a failed commit.
    await writing
    await q.cancel(tag)
    await q.delete(if_unused=False, if_empty=False)
    await session.close()
    await conn.close()
    window = await db.fetchval(
        "SELECT extract(epoch FROM max(recorded_at) - min(received_at)) FROM py_audit"
    )
    succeeded = await db.fetchval("SELECT count(*) FROM py_audit WHERE outcome = 'succeeded'")
    await db.close()
    return float(window or 0), succeeded


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["fill", "work", "drop"])
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--api", default="http://127.0.0.1:8080")
    a = p.parse_args()
    amqp_url = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
    queue = os.environ["QUEUE"]
    if a.mode == "fill":
        asyncio.run(fill(amqp_url, queue, a.requests))
        return
    if a.mode == "drop":
        asyncio.run(drop(amqp_url, queue))
        return
    window, succeeded = asyncio.run(
        work(
            amqp_url,
            os.environ["DATABASE_URL"],
            queue,
            a.api,
            a.requests,
            a.concurrency,
            os.environ.get("TOKEN", "bench"),
        )
    )
    ru = resource.getrusage(resource.RUSAGE_SELF)
    cpu = ru.ru_utime + ru.ru_stime
    print(
        json.dumps(
            {
                "requests": a.requests,
                "succeeded": succeeded,
                "concurrency": a.concurrency,
                "drain_window_s": round(window, 3),
                "terminations_per_s": round(a.requests / window) if window else None,
                "worker_cpu_s": round(cpu, 3),
                "worker_cpu_us_per_termination": round(cpu * 1e6 / a.requests, 1),
            }
        )
    )
    if succeeded != a.requests:
        raise SystemExit(f"not correct: {succeeded} of {a.requests} requests succeeded")


if __name__ == "__main__":
    main()
