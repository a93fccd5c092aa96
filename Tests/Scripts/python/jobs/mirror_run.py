#!/usr/bin/env python3
"""Run one drive-mirror over QMP (qemu.qmp) against a running monitor — QBlock's
`nbd --qmp` or qemu-storage-daemon — with an optional NBD writer during the mirror.

Usage: mirror_run.py SOCKET WORKDIR [--sync full|top|none] [--copy-mode background|write-blocking]
                     [--writes N] [--speed BYTES] [--cancel]

WORKDIR holds src.qcow2 (the source). The script adds it as node 'src', exports it writable
over NBD (WORKDIR/nbd.sock) when N > 0, starts drive-mirror to WORKDIR/tgt.qcow2, runs
qemu-io with N writes through the export, waits for BLOCK_JOB_READY, completes (or cancels),
waits for the end and quits the monitor. The same writes are applied to WORKDIR/ref.qcow2 (a
copy of the source made first), so that afterwards `qemu-img compare ref.qcow2 tgt.qcow2`
checks the copy. Prints one JSON line: timings (seconds) and the events seen.
Exits 3 if qemu.qmp is missing.
"""
import argparse
import asyncio
import json
import logging
import random
import shutil
import subprocess
import sys
import time

# quit closes the connection under the client's reader: not an error here.
logging.getLogger("asyncio").setLevel(logging.CRITICAL)

try:
    from qemu.qmp import QMPClient
except ImportError:
    print(json.dumps({"error": "qemu.qmp not installed"}), flush=True)
    sys.exit(3)


def writer_commands(n, size, seed=7):
    rng = random.Random(seed)
    cmds = []
    for _ in range(n):
        length = 4096 * rng.randint(1, 16)
        off = rng.randrange(0, (size - length) // 4096) * 4096
        cmds.append(f"write -P {rng.randint(1, 255)} {off} {length}")
    return cmds


async def wait_event(events, name, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for i, ev in enumerate(events):
            if ev["event"] == name:
                return events.pop(i)
        await asyncio.sleep(0.005)
    raise TimeoutError(f"no {name} within {timeout}s; events: {[e['event'] for e in events]}")


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("socket")
    ap.add_argument("workdir")
    ap.add_argument("--sync", default="full")
    ap.add_argument("--copy-mode", default="background")
    ap.add_argument("--writes", type=int, default=0)
    ap.add_argument("--speed", type=int, default=0)
    ap.add_argument("--cancel", action="store_true")
    ap.add_argument("--timeout", type=float, default=300)
    a = ap.parse_args()
    d = a.workdir
    shutil.copyfile(f"{d}/src.qcow2", f"{d}/ref.qcow2")

    qmp = QMPClient("mirror-run")
    await qmp.connect(a.socket)
    events, seen = [], []

    async def collect():
        async for ev in qmp.events:
            events.append(dict(ev))
            seen.append(ev["event"])
    collector = asyncio.create_task(collect())

    await qmp.execute("blockdev-add", {"driver": "qcow2", "node-name": "src",
                                       "file": {"driver": "file", "filename": f"{d}/src.qcow2"}})
    info = await qmp.execute("query-named-block-nodes", {"flat": True})
    size = next(n["image"]["virtual-size"] for n in info if n["node-name"] == "src")
    writer = None
    cmds = writer_commands(a.writes, size)
    if a.writes:
        await qmp.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": f"{d}/nbd.sock"}}})
        await qmp.execute("block-export-add", {"type": "nbd", "id": "e0", "node-name": "src", "writable": True, "name": "src"})
    t0 = time.monotonic()
    args = {"job-id": "m0", "device": "src", "target": f"{d}/tgt.qcow2", "format": "qcow2",
            "sync": a.sync, "mode": "absolute-paths", "copy-mode": a.copy_mode}
    if a.speed:
        args["speed"] = a.speed
    await qmp.execute("drive-mirror", args)
    if a.writes:
        argv = ["qemu-io", "-f", "raw"]
        for c in cmds:
            argv += ["-c", c]
        writer = subprocess.Popen(argv + [f"nbd+unix:///src?socket={d}/nbd.sock"], stdout=subprocess.DEVNULL)
    await wait_event(events, "BLOCK_JOB_READY", a.timeout)
    t_ready = time.monotonic() - t0
    jobs = await qmp.execute("query-block-jobs")
    assert jobs and jobs[0]["ready"] and jobs[0]["device"] == "m0", jobs
    t1 = time.monotonic()
    if a.cancel:
        if writer:
            writer.wait()
        await qmp.execute("block-job-cancel", {"device": "m0"})
    else:
        await qmp.execute("block-job-complete", {"device": "m0"})
    end = await wait_event(events, "BLOCK_JOB_COMPLETED", a.timeout)
    t_done = time.monotonic() - t1
    assert "error" not in end["data"], end
    if writer:
        writer.wait()
    assert await qmp.execute("query-block-jobs") == []
    await asyncio.sleep(0.05)
    if a.writes:
        await qmp.execute("block-export-del", {"id": "e0"})
        await asyncio.sleep(0.05)
        await qmp.execute("nbd-server-stop")
    try:
        await qmp.execute("quit")
    except Exception:
        pass
    collector.cancel()
    try:
        await qmp.disconnect()
    except (EOFError, ConnectionError):
        pass
    if cmds:
        argv = ["qemu-io", "-f", "qcow2"]
        for c in cmds:
            argv += ["-c", c]
        subprocess.run(argv + [f"{d}/ref.qcow2"], check=True, stdout=subprocess.DEVNULL)
    print(json.dumps({"ready_s": round(t_ready, 3), "complete_s": round(t_done, 3), "events": seen}), flush=True)


asyncio.run(main())
