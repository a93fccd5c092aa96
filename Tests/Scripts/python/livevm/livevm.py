#!/usr/bin/env python3
"""Live block operations on a running guest, driven over QMP with QEMU's qemu.qmp client.

Boots `vm --qmp` with the lvwriter guest (guests/riscv-writer) on a qcow2 disk, lets the guest
append numbered, checksummed blocks to /dev/vda, and while it writes runs the steps asked for:

  snapshot    blockdev-snapshot-sync of the drive to a qcow2 overlay
  stopcont    stop, external `qemu-img convert -U` of the active image, cont; the copy must
              be a consistent prefix of the guest's blocks
  stream      block-stream of the overlay (the base's blocks copied up, backing dropped)
  mirror-nbd  blockdev-mirror copy-mode=write-blocking to an NBD target served by qemu-nbd,
              block-job-complete (pivot)
  mirror-bg   blockdev-mirror copy-mode=background to a qcow2 file, block-job-cancel after
              BLOCK_JOB_READY; the copy must be a consistent prefix
  latency     (benchmark) the guest's longest write latency around a snapshot and a pivot

Then types 'q' on the guest console: the writer verifies every acknowledged block and the
guest powers off. On the host every qcow2 image must pass `qemu-img check` and the final
image must hold exactly the blocks the guest acknowledged.

Usage: livevm.py --vm VM --kernel K --initrd I --workdir DIR [--steps a,b,...] [--json OUT]
Exit status: 0 pass, 1 failure, 77 skipped (qemu.qmp or qemu tools missing).
"""
import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import blocks  # noqa: E402

try:
    from qemu.qmp import QMPClient, ExecuteError
except ImportError:
    print("livevm: SKIP qemu.qmp is not installed")
    sys.exit(77)

DISK_SIZE = os.environ.get("LIVEVM_DISK_SIZE", "256M")


NARRATION = {
    "snapshot": "blockdev-snapshot-sync: new writes go to a qcow2 overlay, the base becomes its backing file",
    "stopcont": "stop (vCPU parked, disks drained and flushed), qemu-img convert of the disk, cont",
    "stream": "block-stream: copy the base's blocks up into the overlay, then drop the backing file",
    "mirror-nbd": "blockdev-mirror copy-mode=write-blocking to an NBD server, then block-job-complete (pivot)",
    "mirror-bg": "blockdev-mirror copy-mode=background to a file, block-job-cancel after READY (a point-in-time copy)",
}


NEEDS = {"stream": "block-stream", "mirror-nbd": "blockdev-mirror", "mirror-bg": "blockdev-mirror",
         "lat-pivot": "blockdev-mirror", "throughput": "blockdev-mirror"}


class Failure(Exception):
    pass


class Guest:
    """The vm process: console lines in, console commands out."""

    def __init__(self, args, drive, qmp_path, log_path):
        self.args, self.drive, self.qmp_path = args, drive, qmp_path
        self.log = open(log_path, "w")
        self.lines = []
        self.acked = 0
        self.marks = asyncio.Queue()
        self.final = None
        self.verdict = None
        self.failures = []
        self.changed = asyncio.Event()

    async def start(self):
        append = "console=ttyS0 cryptomgr.notests quiet WSYNC=%d" % self.args.sync_every
        cmd = [self.args.vm, "--kernel", self.args.kernel, "--initrd", self.args.initrd, "--memory", "256M",
               "--append", append, "--drive", self.drive, "--qmp", self.qmp_path]
        env = dict(os.environ)
        if self.args.trace:
            env["QBLOCK_QMP_TRACE"] = "1"
        self.proc = await asyncio.create_subprocess_exec(*cmd, env=env, stdin=asyncio.subprocess.PIPE,
                                                         stdout=asyncio.subprocess.PIPE,
                                                         stderr=asyncio.subprocess.PIPE)
        self.reader = asyncio.create_task(self._read())
        self.err_reader = asyncio.create_task(self._read_err())

    async def _read_err(self):
        self.stderr = b""
        while True:
            b = await self.proc.stderr.read(4096)
            if not b:
                return
            self.stderr += b

    async def _read(self):
        while True:
            raw = await self.proc.stdout.readline()
            if not raw:
                self.changed.set()
                return
            line = raw.decode(errors="replace").rstrip("\r\n")
            self.log.write(line + "\n")
            self.log.flush()
            self.lines.append(line)
            m = re.search(r"writer: acked=(\d+)", line)
            if m:
                self.acked = int(m.group(1))
            m = re.search(r"writer: mark blocks=(\d+) us=(\d+) maxlat_us=(\d+) maxsync_us=(\d+) acked=(\d+)", line)
            if m:
                b, us, lat, sync, acked = map(int, m.groups())
                self.acked = max(self.acked, acked)
                self.marks.put_nowait({"blocks": b, "us": us, "maxlat_us": lat, "maxsync_us": sync, "acked": acked})
            m = re.search(r"writer: final acked=(\d+) failures=(\d+)", line)
            if m:
                self.final = (int(m.group(1)), int(m.group(2)))
            if "VERIFY FAIL" in line or "WRITE FAIL" in line or "FLUSH FAIL" in line:
                self.failures.append(line)
            if line.strip() in ("writer: PASS", "writer: FAIL"):
                self.verdict = line.strip()
            self.changed.set()

    async def wait_for(self, what, pred, timeout):
        deadline = time.monotonic() + timeout
        while not pred():
            if self.proc.returncode is not None or self.reader.done():
                if pred():
                    break
                raise Failure("vm ended while waiting for %s (status %s)\n%s" % (what, self.proc.returncode, self.tail()))
            left = deadline - time.monotonic()
            if left <= 0:
                raise Failure("timed out waiting for %s\n%s" % (what, self.tail()))
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), min(left, 1.0))
            except asyncio.TimeoutError:
                pass

    async def wait_acked(self, n, timeout=120):
        await self.wait_for("the guest to acknowledge %d blocks" % n, lambda: self.acked >= n, timeout)

    def send(self, text):
        self.proc.stdin.write((text + "\n").encode())

    async def mark(self, timeout=30):
        self.send("m")
        return await asyncio.wait_for(self.marks.get(), timeout)

    def tail(self, n=25):
        return "\n".join("    | " + l for l in self.lines[-n:])


class Run:
    def __init__(self, args):
        self.args = args
        self.w = args.workdir
        self.timings = []
        self.problems = []
        self.images = []          # (path, fmt) to check with qemu-img check at the end
        self.copies = []          # (name, path, fmt, at_least) consistent prefixes
        self.events = []
        self.nbd = None
        self.results = {}

    def path(self, name):
        return os.path.join(self.w, name)

    def time(self, name, seconds, extra=""):
        self.timings.append((name, seconds))
        print("livevm: %-22s %8.1f ms%s" % (name, seconds * 1000, extra), flush=True)

    async def collect_events(self):
        async for ev in self.qmp.events:
            self.events.append(dict(ev))

    async def wait_event(self, name, timeout=60, **match):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i, ev in enumerate(self.events):
                if ev.get("event") == name and all(ev.get("data", {}).get(k) == v for k, v in match.items()):
                    return self.events.pop(i)
            await asyncio.sleep(0.01)
        raise Failure("no %s event %s within %d s (events: %s)" % (name, match, timeout, [e.get("event") for e in self.events]))

    async def execute(self, cmd, arguments=None):
        try:
            return await self.qmp.execute(cmd, arguments)
        except ExecuteError as e:
            raise Failure("%s %s: %s" % (cmd, json.dumps(arguments), e))

    async def timed(self, name, cmd, arguments=None):
        t0 = time.monotonic()
        r = await self.execute(cmd, arguments)
        self.time(name, time.monotonic() - t0)
        return r

    # --- steps ---------------------------------------------------------------------------

    async def step_snapshot(self):
        self.nov = getattr(self, "nov", 0) + 1
        suffix = "" if self.nov == 1 else str(self.nov)
        ov, name = self.path("overlay%s.qcow2" % suffix), "overlay%s" % suffix
        await self.timed("snapshot", "blockdev-snapshot-sync",
                         {"device": "disk0", "snapshot-file": ov, "snapshot-node-name": name, "format": "qcow2"})
        names = [n["node-name"] for n in await self.execute("query-named-block-nodes")]
        if name not in names:
            raise Failure("overlay missing from query-named-block-nodes: %s" % names)
        self.active = (ov, "qcow2")
        self.images.append((ov, "qcow2"))

    async def step_stopcont(self):
        before = self.g.acked
        t0 = time.monotonic()
        await self.execute("stop")
        await self.wait_event("STOP", 10)
        self.time("stop", time.monotonic() - t0)
        st = await self.execute("query-status")
        if st.get("status") != "paused" or st.get("running") is not False:
            raise Failure("query-status after stop: %s" % st)
        frozen = len(self.g.lines)
        copy = self.path("stopped-copy.raw")
        t0 = time.monotonic()
        path, fmt = self.active
        subprocess.run(["qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", path, copy], check=True, capture_output=True)
        self.time("external convert", time.monotonic() - t0)
        await asyncio.sleep(0.3)
        moved = [l for l in self.g.lines[frozen:] if "writer: acked=" in l]
        if moved:
            raise Failure("the guest wrote while stopped: %s" % moved)
        t0 = time.monotonic()
        await self.execute("cont")
        await self.wait_event("RESUME", 10)
        self.time("cont", time.monotonic() - t0)
        st = await self.execute("query-status")
        if st.get("status") != "running" or st.get("running") is not True:
            raise Failure("query-status after cont: %s" % st)
        self.copies.append(("stopped copy", copy, "raw", before))

    async def step_stream(self):
        t0 = time.monotonic()
        await self.execute("block-stream", {"job-id": "stream0", "device": "disk0"})
        ev = await self.wait_event("BLOCK_JOB_COMPLETED", 300, device="stream0")
        if "error" in ev.get("data", {}):
            raise Failure("stream failed: %s" % ev)
        self.time("stream", time.monotonic() - t0)
        info = subprocess.run(["qemu-img", "info", "-U", "--output=json", self.active[0]], capture_output=True, text=True)
        if "backing-filename" in info.stdout:
            raise Failure("the overlay still has a backing file after the stream: %s" % info.stdout)

    async def start_qemu_nbd(self, image):
        sock = self.path("target.sock")
        server = self.args.nbd_server
        self.nbd = subprocess.Popen([server, "-f", "qcow2", "-k", sock, "-x", "target", "--cache=writeback", image],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for _ in range(200):
            if os.path.exists(sock):
                return sock
            await asyncio.sleep(0.02)
        raise Failure("qemu-nbd did not start")

    async def step_mirror_nbd(self):
        target = self.path("target.qcow2")
        subprocess.run(["qemu-img", "create", "-f", "qcow2", target, DISK_SIZE], check=True, capture_output=True)
        sock = await self.start_qemu_nbd(target)
        await self.execute("blockdev-add", {"driver": "nbd", "node-name": "target",
                                            "server": {"type": "unix", "path": sock}, "export": "target"})
        t0 = time.monotonic()
        await self.execute("blockdev-mirror", {"job-id": "mirror0", "device": "disk0", "target": "target",
                                               "sync": "full", "copy-mode": "write-blocking"})
        await self.wait_event("BLOCK_JOB_READY", 300, device="mirror0")
        self.time("mirror to NBD (ready)", time.monotonic() - t0)
        await self.g.wait_acked(self.g.acked + 32)
        t0 = time.monotonic()
        await self.execute("block-job-complete", {"device": "mirror0"})
        ev = await self.wait_event("BLOCK_JOB_COMPLETED", 60, device="mirror0")
        if "error" in ev.get("data", {}):
            raise Failure("mirror failed: %s" % ev)
        self.time("pivot", time.monotonic() - t0)
        self.active = (target, "qcow2")
        self.images.append((target, "qcow2"))

    async def step_mirror_bg(self):
        bg = self.path("background.qcow2")
        subprocess.run(["qemu-img", "create", "-f", "qcow2", bg, DISK_SIZE], check=True, capture_output=True)
        await self.execute("blockdev-add", {"driver": "qcow2", "node-name": "bg",
                                            "file": {"driver": "file", "filename": bg}})
        t0 = time.monotonic()
        await self.execute("blockdev-mirror", {"job-id": "mirror1", "device": "disk0", "target": "bg",
                                               "sync": "full", "copy-mode": "background"})
        await self.wait_event("BLOCK_JOB_READY", 300, device="mirror1")
        self.time("background mirror (ready)", time.monotonic() - t0)
        await self.g.wait_acked(self.g.acked + 32)
        before = self.g.acked
        t0 = time.monotonic()
        await self.execute("block-job-cancel", {"device": "mirror1"})
        ev = await self.wait_event("BLOCK_JOB_COMPLETED", 60, device="mirror1")
        if "error" in ev.get("data", {}):
            raise Failure("background mirror failed: %s" % ev)
        self.time("cancel after ready", time.monotonic() - t0)
        await self.execute("blockdev-del", {"node-name": "bg"})
        self.images.append((bg, "qcow2"))
        self.copies.append(("background mirror copy", bg, "qcow2", before))

    async def latency_window(self, name, action):
        """The guest's longest write latency in a window around `action` (a mark before,
        one after), with a quiet window of the same length as the baseline."""
        await self.g.mark()
        await asyncio.sleep(1.0)
        base = await self.g.mark()
        await asyncio.sleep(0.3)
        t0 = time.monotonic()
        err0 = len(self.g.stderr)
        await action()
        dt = time.monotonic() - t0
        await asyncio.sleep(max(0.0, 1.0 - 0.3 - dt))
        during = await self.g.mark()
        held = None
        for line in self.g.stderr[err0:].decode(errors="replace").splitlines():
            m = re.search(r"transaction: drain (\d+) us, drained work (\d+) us, switch\+undrain (\d+) us", line)
            if m:
                held = sum(map(int, m.groups()))
            m = re.search(r"mirror prepare: drain (\d+) us, final copy (\d+) us, target flush (\d+) us, switch\+undrain (\d+) us", line)
            if m:
                held = sum(map(int, m.groups()))
                print("livevm:   " + line.strip(), flush=True)
        self.results[name] = {"baseline": base, "during": during, "held_us": held}
        print("livevm: latency %-12s baseline max %6.2f ms (%d writes), during max %6.2f ms (%d writes)%s" % (
            name, base["maxlat_us"] / 1000, base["blocks"], during["maxlat_us"] / 1000, during["blocks"],
            "" if held is None else ", writers held %.2f ms" % (held / 1000)), flush=True)

    async def throughput_window(self, name, seconds=3.0):
        await self.g.mark()
        await asyncio.sleep(seconds)
        m = await self.g.mark()
        rate = m["blocks"] * 4096 / (m["us"] / 1e6) / 1024
        self.ntp = getattr(self, "ntp", 0) + 1
        self.results["tp%d" % self.ntp] = {"mode": name, "blocks": m["blocks"], "us": m["us"], "KiB/s": rate, "maxlat_us": m["maxlat_us"]}
        print("livevm: throughput %-24s %8.1f KiB/s (%d writes in %.1f s)" % (name, rate, m["blocks"], m["us"] / 1e6), flush=True)

    # --- the run -------------------------------------------------------------------------

    async def main(self):
        a = self.args
        self.disk_bytes = int(DISK_SIZE[:-1]) << 20
        base = self.path("base.qcow2")
        subprocess.run(["qemu-img", "create", "-f", "qcow2", base, DISK_SIZE], check=True, capture_output=True)
        self.active = (base, "qcow2")
        self.images.append((base, "qcow2"))
        qmp_path = self.path("qmp.sock")
        self.g = Guest(a, "file=%s,format=qcow2,id=disk0,node-name=base" % base, qmp_path, self.path("console.log"))
        t0 = time.monotonic()
        await self.g.start()
        for _ in range(500):
            if os.path.exists(qmp_path):
                break
            await asyncio.sleep(0.02)
        self.qmp = QMPClient("livevm")
        await self.qmp.connect(qmp_path)
        collector = asyncio.create_task(self.collect_events())
        try:
            st = await self.execute("query-status")
            if st != {"status": "running", "singlestep": False, "running": True}:
                raise Failure("query-status at start: %s" % st)
            await self.g.wait_for("the writer to start", lambda: any("writer: start" in l for l in self.g.lines), a.boot_timeout)
            self.time("boot to writer", time.monotonic() - t0)
            await self.g.wait_acked(64)
            commands = {c["name"] for c in await self.execute("query-commands")}
            for step in a.steps:
                need = NEEDS.get(step)
                if need and need not in commands:
                    print("livevm: SKIP step %s: %s is not available in this build" % (step, need), flush=True)
                    continue
                if step in ("lat-snapshot", "lat-pivot", "throughput"):
                    await getattr(self, "bench_" + step.replace("-", "_"))()
                    continue
                if a.narrate:
                    print("\nlivevm: --- %s: %s (guest has written %d blocks so far)" % (step, NARRATION.get(step, ""), self.g.acked), flush=True)
                await getattr(self, "step_" + step.replace("-", "_"))()
                await self.g.wait_acked(self.g.acked + 32)
            t0 = time.monotonic()
            self.g.send("q")
            await self.g.wait_for("the writer's verdict", lambda: self.g.verdict is not None, 600)
            self.time("final verify", time.monotonic() - t0)
            await self.wait_event("SHUTDOWN", 60, guest=True, reason="guest-shutdown")
            rc = await asyncio.wait_for(self.g.proc.wait(), 60)
            if rc != 0:
                raise Failure("vm exited %d: %s" % (rc, self.g.stderr.decode(errors="replace")))
        finally:
            collector.cancel()
            try:
                await self.qmp.disconnect()
            except Exception:
                pass
            if self.g.proc.returncode is None:
                self.g.proc.kill()
                await self.g.proc.wait()
            if self.nbd:
                try:
                    self.nbd.wait(30)
                except subprocess.TimeoutExpired:
                    self.nbd.kill()
                    self.nbd.wait()
        # --- host checks ---
        if self.g.failures or self.g.verdict != "writer: PASS":
            raise Failure("the guest reports: %s %s\n%s" % (self.g.verdict, self.g.failures, self.g.tail()))
        acked = self.g.final[0]
        print("livevm: guest acknowledged %d blocks (%.1f MiB), verified them all" % (acked, acked * 4096 / 2**20), flush=True)
        for path, fmt in self.images:
            r = subprocess.run(["qemu-img", "check", "-f", fmt, path], capture_output=True, text=True)
            if r.returncode != 0:
                self.problems.append("qemu-img check %s: %d %s%s" % (os.path.basename(path), r.returncode, r.stdout, r.stderr))
            else:
                print("livevm: qemu-img check %s: clean" % os.path.basename(path), flush=True)
        k, p = blocks.check_image(self.active[0], self.active[1], acked=acked)
        self.problems += ["final image %s: %s" % (os.path.basename(self.active[0]), x) for x in p]
        if not p:
            print("livevm: final image %s holds exactly the %d acknowledged blocks" % (os.path.basename(self.active[0]), k), flush=True)
        for name, path, fmt, at_least in self.copies:
            k, p = blocks.check_image(path, fmt, at_least=at_least)
            self.problems += ["%s: %s" % (name, x) for x in p]
            if not p:
                print("livevm: %s is consistent: blocks 0..%d (the guest had acknowledged >= %d)" % (name, k - 1, at_least), flush=True)
        if self.problems:
            raise Failure("\n".join(self.problems))
        if self.args.reference:
            # What the final image must hold: the acknowledged blocks, zeros after them.
            with open(self.args.reference, "wb") as f:
                for n in range(acked):
                    f.write(blocks.expected(n))
                f.truncate(self.disk_bytes)

    async def bench_lat_snapshot(self):
        self.nsnap = getattr(self, "nsnap", 0) + 1
        ov = self.path("bench-overlay%d.qcow2" % self.nsnap)

        async def snap():
            await self.execute("blockdev-snapshot-sync", {"device": "disk0", "snapshot-file": ov,
                                                          "snapshot-node-name": "bench-ov%d" % self.nsnap, "format": "qcow2"})
        await self.latency_window("snapshot%d" % self.nsnap, snap)
        self.active = (ov, "qcow2")
        self.images.append((ov, "qcow2"))

    async def bench_lat_pivot(self):
        self.npivot = getattr(self, "npivot", 0) + 1
        target = self.path("bench-target%d.qcow2" % self.npivot)
        subprocess.run(["qemu-img", "create", "-f", "qcow2", target, DISK_SIZE], check=True, capture_output=True)
        job = "bm%d" % self.npivot
        await self.execute("blockdev-add", {"driver": "qcow2", "node-name": "bt%d" % self.npivot,
                                            "file": {"driver": "file", "filename": target}})
        await self.execute("blockdev-mirror", {"job-id": job, "device": "disk0", "target": "bt%d" % self.npivot, "sync": "full"})
        await self.wait_event("BLOCK_JOB_READY", 300, device=job)

        async def pivot():
            await self.execute("block-job-complete", {"device": job})
            await self.wait_event("BLOCK_JOB_COMPLETED", 60, device=job)
        await self.latency_window("pivot%d" % self.npivot, pivot)
        self.active = (target, "qcow2")
        self.images.append((target, "qcow2"))

    async def bench_throughput(self):
        await self.throughput_window("no job")
        for mode in ("background", "write-blocking"):
            t = self.path("tp-%s.qcow2" % mode)
            subprocess.run(["qemu-img", "create", "-f", "qcow2", t, DISK_SIZE], check=True, capture_output=True)
            name = "tp" + mode[:2]
            await self.execute("blockdev-add", {"driver": "qcow2", "node-name": name,
                                                "file": {"driver": "file", "filename": t}})
            await self.execute("blockdev-mirror", {"job-id": name, "device": "disk0", "target": name,
                                                   "sync": "full", "copy-mode": mode})
            await self.wait_event("BLOCK_JOB_READY", 300, device=name)
            await self.throughput_window("mirror %s (ready)" % mode)
            await self.execute("block-job-cancel", {"device": name})
            await self.wait_event("BLOCK_JOB_COMPLETED", 60, device=name)
            await self.execute("blockdev-del", {"node-name": name})
            self.images.append((t, "qcow2"))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--vm", required=True)
    p.add_argument("--kernel", required=True)
    p.add_argument("--initrd", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--steps", default="snapshot,stopcont")
    p.add_argument("--sync-every", type=int, default=32)
    p.add_argument("--boot-timeout", type=float, default=300)
    p.add_argument("--json")
    p.add_argument("--trace", action="store_true", help="run vm with QBLOCK_QMP_TRACE=1 (drained-section timing)")
    p.add_argument("--nbd-server", default="qemu-nbd", help="the NBD server for mirror-nbd (qemu-nbd or this project's nbd)")
    p.add_argument("--reference", help="write a raw image of exactly the acknowledged blocks here")
    p.add_argument("--narrate", action="store_true", help="say what each step does (make demo)")
    a = p.parse_args()
    a.steps = [s for s in a.steps.split(",") if s]
    for tool in ("qemu-img", "qemu-nbd"):
        if not shutil.which(tool):
            print("livevm: SKIP %s is not installed" % tool)
            sys.exit(77)
    os.makedirs(a.workdir, exist_ok=True)
    run = Run(a)
    t0 = time.monotonic()
    try:
        asyncio.run(run.main())
    except Failure as e:
        print("livevm: FAIL %s" % e, flush=True)
        sys.exit(1)
    finally:
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"timings": run.timings, "results": run.results}, f, indent=1)
    print("livevm: PASS (%.1f s)" % (time.monotonic() - t0), flush=True)


if __name__ == "__main__":
    main()
