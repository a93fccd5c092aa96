#!/usr/bin/env python3
"""The machine commands of `vm --qmp` with QEMU's qemu.qmp client, on any kernel that runs
until stopped (the tests use a one-instruction loop).

Usage: control.py --vm VM --kernel K --workdir DIR --case quit|reset|signal
  quit    query-status, query-named-block-nodes, stop/stop/cont/cont (STOP and RESUME once
          each), system_powerdown (POWERDOWN), quit (SHUTDOWN host-qmp-quit, exit 0)
  reset   system_reset (SHUTDOWN host-qmp-system-reset, exit 0), cont afterwards refused
  signal  SIGTERM (SHUTDOWN host-signal, exit 1)
Prints "control: PASS" or "control: FAIL ..."; exit status 0, 1, or 77 when qemu.qmp is missing.
"""
import argparse
import asyncio
import os
import signal
import sys

try:
    from qemu.qmp import QMPClient, ExecuteError
except ImportError:
    print("control: SKIP qemu.qmp is not installed")
    sys.exit(77)


class Failure(Exception):
    pass


async def run(a):
    disk = os.path.join(a.workdir, "disk.raw")
    with open(disk, "wb") as f:
        f.truncate(1 << 20)
    sock = os.path.join(a.workdir, "qmp.sock")
    proc = await asyncio.create_subprocess_exec(a.vm, "--kernel", a.kernel, "--memory", "64M",
                                                "--drive", "file=%s,format=raw,id=disk0" % disk, "--qmp", sock,
                                                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    for _ in range(500):
        if os.path.exists(sock):
            break
        await asyncio.sleep(0.02)
    qmp = QMPClient("control")
    await qmp.connect(sock)
    events = []

    async def collect():
        async for ev in qmp.events:
            events.append(dict(ev))
    collector = asyncio.create_task(collect())

    async def expect_event(name, data=None, timeout=10):
        for _ in range(int(timeout * 100)):
            for i, ev in enumerate(events):
                if ev["event"] == name:
                    events.pop(i)
                    if data is not None and ev.get("data") != data:
                        raise Failure("%s data %s, expected %s" % (name, ev.get("data"), data))
                    return ev
            await asyncio.sleep(0.01)
        raise Failure("no %s event (have %s)" % (name, events))

    async def status(expected):
        st = await qmp.execute("query-status")
        want = {"status": expected, "singlestep": False, "running": expected == "running"}
        if st != want:
            raise Failure("query-status %s, expected %s" % (st, want))

    try:
        await status("running")
        if a.case == "quit":
            nodes = await qmp.execute("query-named-block-nodes")
            names = [n["node-name"] for n in nodes]
            if "disk0-format" not in names or len(names) != 2:
                raise Failure("query-named-block-nodes: %s" % names)
            await qmp.execute("stop")
            await expect_event("STOP")
            await status("paused")
            await qmp.execute("stop")
            await qmp.execute("cont")
            await expect_event("RESUME")
            await status("running")
            await qmp.execute("cont")
            await qmp.execute("system_powerdown")
            await expect_event("POWERDOWN")
            await asyncio.sleep(0.1)
            extra = [e["event"] for e in events if e["event"] in ("STOP", "RESUME")]
            if extra:
                raise Failure("a second stop or cont sent %s" % extra)
            await status("running")
            await qmp.execute("quit")
            await expect_event("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
            want_rc = 0
        elif a.case == "reset":
            await qmp.execute("system_reset")
            await expect_event("SHUTDOWN", {"guest": False, "reason": "host-qmp-system-reset"})
            want_rc = 0
        else:
            proc.send_signal(signal.SIGTERM)
            await expect_event("SHUTDOWN", {"guest": False, "reason": "host-signal"})
            want_rc = 1
        rc = await asyncio.wait_for(proc.wait(), 30)
        if rc != want_rc:
            raise Failure("vm exited %d, expected %d: %s" % (rc, want_rc, (await proc.stderr.read()).decode()))
    finally:
        collector.cancel()
        try:
            await qmp.disconnect()
        except Exception:
            pass
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--vm", required=True)
    p.add_argument("--kernel", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--case", required=True, choices=["quit", "reset", "signal"])
    a = p.parse_args()
    try:
        asyncio.run(asyncio.wait_for(run(a), 120))
    except (Failure, asyncio.TimeoutError, ExecuteError) as e:
        print("control: FAIL %s: %r" % (a.case, e))
        sys.exit(1)
    print("control: PASS")


if __name__ == "__main__":
    main()
