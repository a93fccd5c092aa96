#!/usr/bin/env python3
"""Stream, commit and the job verbs over QMP (qemu.qmp) against a running monitor.

Usage: jobs_qmp.py SOCKET WORKDIR

WORKDIR holds base.raw <- mid.qcow2 <- top.qcow2 (made by the caller). Steps:
 1. blockdev-add the chain (top with its backing chain opened by the driver) as node 'top';
 2. block-stream with base-node = the raw base's node, auto-dismiss false, speed limited:
    pause, check paused in query-block-jobs, set-speed, resume, wait for concluded,
    check query-jobs, job-dismiss;
 3. block-commit of the active layer into the base: READY, complete, COMPLETED;
 4. error cases: unknown job, verbs refused in the wrong state (QEMU's messages).
Prints one JSON line {"ok": true, "events": [...]} or raises.
"""
import asyncio
import json
import logging
import sys
import time

# quit closes the connection under the client's reader: not an error here.
logging.getLogger("asyncio").setLevel(logging.CRITICAL)

try:
    from qemu.qmp import QMPClient, ExecuteError
except ImportError:
    print(json.dumps({"error": "qemu.qmp not installed"}), flush=True)
    sys.exit(3)


async def main(sock, d):
    qmp = QMPClient("jobs-qmp")
    await qmp.connect(sock)
    events, seen = [], []

    async def collect():
        async for ev in qmp.events:
            events.append(dict(ev))
            seen.append((ev["event"], ev.get("data", {}).get("status")))
    collector = asyncio.create_task(collect())

    async def wait(name, pred=lambda e: True, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i, ev in enumerate(events):
                if ev["event"] == name and pred(ev):
                    return events.pop(i)
            await asyncio.sleep(0.005)
        raise TimeoutError(name)

    async def error_of(cmd, args):
        try:
            await qmp.execute(cmd, args)
        except ExecuteError as e:
            return e.received["error"]["desc"]
        raise AssertionError(f"{cmd} succeeded")

    await qmp.execute("blockdev-add", {"driver": "raw", "node-name": "base",
                                       "file": {"driver": "file", "filename": f"{d}/base.raw"}})
    await qmp.execute("blockdev-add", {"driver": "qcow2", "node-name": "mid", "backing": "base",
                                       "file": {"driver": "file", "filename": f"{d}/mid.qcow2"}})
    await qmp.execute("blockdev-add", {"driver": "qcow2", "node-name": "top", "backing": "mid",
                                       "file": {"driver": "file", "filename": f"{d}/top.qcow2"}})

    assert await error_of("block-job-pause", {"device": "nope"}) == "Block job 'nope' not found"
    assert await error_of("job-dismiss", {"id": "nope"}) == "Job not found"

    # Stream mid into top, keeping base.
    await qmp.execute("block-stream", {"job-id": "s0", "device": "top", "base-node": "base",
                                       "speed": 65536, "auto-dismiss": False})
    await qmp.execute("block-job-pause", {"device": "s0"})
    await wait("JOB_STATUS_CHANGE", lambda e: e["data"]["status"] == "paused")
    jobs = await qmp.execute("query-block-jobs")
    assert jobs[0]["paused"] and jobs[0]["status"] == "paused" and jobs[0]["type"] == "stream", jobs
    assert await error_of("block-job-complete", {"device": "s0"}) == \
        "Job 's0' in state 'paused' cannot accept command verb 'complete'"
    await qmp.execute("block-job-set-speed", {"device": "s0", "speed": 0})
    await qmp.execute("block-job-resume", {"device": "s0"})
    done = await wait("BLOCK_JOB_COMPLETED")
    assert done["data"]["device"] == "s0" and "error" not in done["data"], done
    await wait("JOB_STATUS_CHANGE", lambda e: e["data"]["status"] == "concluded")
    jobs = await qmp.execute("query-jobs")
    assert jobs[0]["status"] == "concluded" and jobs[0]["current-progress"] == jobs[0]["total-progress"], jobs
    await qmp.execute("job-dismiss", {"id": "s0"})
    assert await qmp.execute("query-jobs") == []

    # Active commit of top into base.
    await qmp.execute("block-commit", {"job-id": "c0", "device": "top", "base-node": "base"})
    ready = await wait("BLOCK_JOB_READY")
    assert ready["data"]["type"] == "commit", ready
    await qmp.execute("block-job-complete", {"device": "c0"})
    await wait("BLOCK_JOB_COMPLETED")
    await wait("JOB_STATUS_CHANGE", lambda e: e["data"]["status"] == "null")
    assert await qmp.execute("query-block-jobs") == []
    try:
        await qmp.execute("quit")
    except Exception:
        pass
    collector.cancel()
    try:
        await qmp.disconnect()
    except (EOFError, ConnectionError):
        pass
    print(json.dumps({"ok": True, "events": [e for e, _ in seen]}), flush=True)


asyncio.run(main(sys.argv[1], sys.argv[2]))
