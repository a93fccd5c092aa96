#!/usr/bin/env python3
"""Regression cases for live operations that once returned wrong data, driven over QMP
(qemu.qmp) against a running monitor — QBlock's `nbd --qmp` or qemu-storage-daemon.

Usage: live_regressions.py SOCKET WORKDIR CASE [--seed N]

CASE is one of:
  cor             a copy-on-read filter over top (backing: base) exported read-only over
                  NBD must read what top reads, and copy the backing data up into top;
  mirror-none     drive-mirror sync=none: the target's backing file is the source image
                  itself, so after the pivot target -> source -> base holds every byte;
  mirror-top      drive-mirror sync=top: target -> base after the pivot;
  blocking-top    copy-mode write-blocking with sync=top and small unaligned writes;
  blocking-none   the same with sync=none;
  granularity-*   a granularity below the target's cluster size;
  existing-*      mode=existing onto a target the user made with the right backing file;
  nbd-*           mode=existing onto an NBD target served by qemu-nbd.

Every case compares the bytes a client reads (and, after the daemon quit, what the image
files hold through their recorded backing chains) with a model kept in Python, and checks
the backing file names. Prints one JSON line {"ok": true, ...} or exits non-zero with the
first difference. Exits 3 if qemu.qmp is missing.
"""
import argparse
import asyncio
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time

logging.getLogger("asyncio").setLevel(logging.CRITICAL)

try:
    from qemu.qmp import QMPClient
except ImportError:
    print(json.dumps({"error": "qemu.qmp not installed"}), flush=True)
    sys.exit(3)

MiB = 1 << 20
SIZE = 32 * MiB


def sh(*argv, **kw):
    r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.decode()}{r.stdout.decode()}")
    return r.stdout


def qemu_io(target, cmds, fmt=None):
    argv = ["qemu-io"]
    if fmt:
        argv += ["-f", fmt]
    for c in cmds:
        argv += ["-c", c]
    sh(*argv, target)


def default_signals():
    """A test runner may start us with SIGTERM blocked or ignored: a server we start must
    still stop when asked."""
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


class Model:
    """Guest-visible bytes of one disk."""

    def __init__(self, size):
        self.data = bytearray(size)

    def write(self, off, length, pattern):
        self.data[off:off + length] = bytes([pattern]) * length


def read_all(path_or_uri, fmt, out, uncached=False):
    argv = ["qemu-img", "convert", "-f", fmt, "-O", "raw"]
    if uncached:
        argv.insert(2, "-U")
    sh(*argv, path_or_uri, out)
    with open(out, "rb") as f:
        return f.read()


def first_difference(got, want):
    if len(got) != len(want):
        return f"length {len(got)} != {len(want)}"
    for i in range(0, len(want), 4096):
        if got[i:i + 4096] != want[i:i + 4096]:
            j = next(k for k in range(i, min(i + 4096, len(want))) if got[k] != want[k])
            bad = sum(1 for b in range(0, len(want), 65536) if got[b:b + 65536] != want[b:b + 65536])
            return f"first difference at byte {j}: got {got[j]:#x}, want {want[j]:#x} ({bad} of {len(want) // 65536} 64 KiB blocks differ)"
    return None


def expect_same(what, got, want):
    diff = first_difference(got, want)
    if diff:
        raise AssertionError(f"{what}: {diff}")


def backing_of(path):
    info = json.loads(sh("qemu-img", "info", "-U", "--output=json", path))
    return info.get("full-backing-filename") or info.get("backing-filename")


def check(path):
    r = subprocess.run(["qemu-img", "check", "-U", path], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        raise AssertionError(f"qemu-img check {path}: {r.stdout.decode()}")


class Session:
    def __init__(self, sock, d):
        self.sock, self.d = sock, d
        self.events = []

    async def __aenter__(self):
        self.qmp = QMPClient("live-regressions")
        await self.qmp.connect(self.sock)

        async def collect():
            async for ev in self.qmp.events:
                self.events.append(dict(ev))
        self.collector = asyncio.create_task(collect())
        return self

    async def __aexit__(self, *exc):
        try:
            await self.qmp.execute("quit")
        except Exception:
            pass
        self.collector.cancel()
        try:
            await self.qmp.disconnect()
        except Exception:
            pass

    async def x(self, cmd, args=None):
        return await self.qmp.execute(cmd, args or {})

    async def wait(self, name, timeout=60, job=None):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i, ev in enumerate(self.events):
                if ev["event"] == name and (job is None or ev.get("data", {}).get("device") == job):
                    return self.events.pop(i)
            await asyncio.sleep(0.005)
        raise TimeoutError(f"no {name} within {timeout}s; events: {[e['event'] for e in self.events]}")

    async def export(self, node, name, writable):
        if not getattr(self, "server", False):
            await self.x("nbd-server-start", {"addr": {"type": "unix", "data": {"path": f"{self.d}/nbd.sock"}}})
            self.server = True
        await self.x("block-export-add", {"type": "nbd", "id": name, "node-name": node, "writable": writable,
                                           "name": name})
        return f"nbd+unix:///{name}?socket={self.d}/nbd.sock"


def make_chain(d, base_writes, top_writes, model):
    """base.qcow2 <- src.qcow2 (top), with the writes applied to the model too."""
    sh("qemu-img", "create", "-q", "-f", "qcow2", f"{d}/base.qcow2", str(SIZE))
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", f"{d}/base.qcow2", "-F", "qcow2", f"{d}/src.qcow2")
    for path, writes in ((f"{d}/base.qcow2", base_writes), (f"{d}/src.qcow2", top_writes)):
        if writes:
            qemu_io(path, [f"write -P {p} {o} {n}" for o, n, p in writes], fmt="qcow2")
        for o, n, p in writes:
            model.write(o, n, p)


async def case_cor(s, d, rng):
    model = Model(SIZE)
    make_chain(d, [(0, 24 * MiB, 0x11)], [(20 * MiB, 2 * MiB, 0x22)], model)
    await s.x("blockdev-add", {"driver": "qcow2", "node-name": "base",
                               "file": {"driver": "file", "filename": f"{d}/base.qcow2"}})
    await s.x("blockdev-add", {"driver": "qcow2", "node-name": "top", "backing": "base",
                               "file": {"driver": "file", "filename": f"{d}/src.qcow2"}})
    await s.x("blockdev-add", {"driver": "copy-on-read", "node-name": "cor", "file": "top"})
    uri = await s.export("cor", "cor", writable=False)
    expect_same("read through the copy-on-read filter", read_all(uri, "raw", f"{d}/out.raw"), bytes(model.data))
    # A second read (now from the top image itself) must still be right.
    expect_same("second read through the filter", read_all(uri, "raw", f"{d}/out2.raw"), bytes(model.data))
    await s.x("block-export-del", {"id": "cor"})
    await asyncio.sleep(0.05)
    await s.x("blockdev-del", {"node-name": "cor"})
    await s.x("blockdev-del", {"node-name": "top"})
    await s.x("blockdev-del", {"node-name": "base"})
    return model, {"src.qcow2": f"{d}/base.qcow2"}, ["src.qcow2"]


async def mirror_case(s, d, rng, sync, copy_mode, writes, existing=None, extra=None):
    """existing: qemu-img create options for a target made before the job (mode=existing)."""
    model = Model(SIZE)
    make_chain(d, [(0, 16 * MiB, 0x11)], [(4 * MiB, 4 * MiB, 0x22), (12 * MiB, 512 * 1024, 0x23)], model)
    await s.x("blockdev-add", {"driver": "qcow2", "node-name": "src",
                               "file": {"driver": "file", "filename": f"{d}/src.qcow2"}})
    uri = await s.export("src", "src", writable=True)
    mode = "absolute-paths"
    target = f"{d}/tgt.qcow2"
    fmt = "qcow2"
    if existing == "nbd":
        # The target is an image with the right backing file, served by qemu-nbd; the
        # mirror sees a raw NBD disk.
        backing = {"full": [], "top": ["-b", f"{d}/base.qcow2"], "none": ["-b", f"{d}/src.qcow2"]}[sync]
        sh("qemu-img", "create", "-q", "-f", "qcow2", *backing, *(["-F", "qcow2"] if backing else []),
           f"{d}/tgt.qcow2", str(SIZE))
        s.nbd_target = subprocess.Popen(["qemu-nbd", "-f", "qcow2", "-k", f"{d}/tgt.sock", "-t", "--shared=4",
                                         f"{d}/tgt.qcow2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        preexec_fn=default_signals)
        for _ in range(500):
            if os.path.exists(f"{d}/tgt.sock"):
                break
            time.sleep(0.01)
        mode, target, fmt = "existing", f"nbd+unix:///?socket={d}/tgt.sock", "raw"
    elif existing is not None:
        mode = "existing"
        backing = {"full": [], "top": ["-b", f"{d}/base.qcow2"], "none": ["-b", f"{d}/src.qcow2"]}[sync]
        sh("qemu-img", "create", "-q", "-f", "qcow2", *existing, *backing, *(["-F", "qcow2"] if backing else []),
           f"{d}/tgt.qcow2", str(SIZE))
    await s.x("drive-mirror", {"job-id": "m0", "device": "src", "target": target, "format": fmt,
                               "sync": sync, "mode": mode, "copy-mode": copy_mode, **(extra or {})})
    cmds = []
    for _ in range(writes):
        # Small writes, most of them not cluster aligned, over data of the top image, of the
        # base image and over nothing.
        n = rng.choice([512, 4096, 3 * 4096, 65536 + 4096, 7 * 512])
        o = rng.randrange(0, (SIZE - n) // 512) * 512
        p = rng.randint(0x30, 0xfe)
        cmds.append(f"write -P {p} {o} {n}")
        model.write(o, n, p)
    half = len(cmds) // 2
    if cmds[:half]:
        qemu_io(uri, cmds[:half], fmt="raw")
    await s.wait("BLOCK_JOB_READY", job="m0")
    if cmds[half:]:
        qemu_io(uri, cmds[half:], fmt="raw")
    await s.x("block-job-complete", {"device": "m0"})
    end = await s.wait("BLOCK_JOB_COMPLETED", job="m0")
    assert "error" not in end["data"], end
    # After the pivot the export writes into the target.
    qemu_io(uri, ["write -P 0x5a 1000448 70000"], fmt="raw")
    model.write(1000448, 70000, 0x5a)
    expect_same("read through the export after the pivot", read_all(uri, "raw", f"{d}/out.raw"), bytes(model.data))
    await s.x("block-export-del", {"id": "src"})
    await asyncio.sleep(0.05)
    if existing == "nbd":
        # Let the target server go: the files are checked offline next.
        await s.x("quit")
        s.nbd_target.terminate()
        try:
            s.nbd_target.wait(timeout=20)
        except subprocess.TimeoutExpired:
            s.nbd_target.kill()
            s.nbd_target.wait(timeout=20)
    expected_backing = {"full": None, "top": f"{d}/base.qcow2", "none": f"{d}/src.qcow2"}[sync]
    return model, {"tgt.qcow2": expected_backing}, ["tgt.qcow2", "src.qcow2"]


CASES = {
    "cor": case_cor,
    "mirror-none": lambda s, d, r: mirror_case(s, d, r, "none", "background", 40),
    "mirror-top": lambda s, d, r: mirror_case(s, d, r, "top", "background", 40),
    "blocking-top": lambda s, d, r: mirror_case(s, d, r, "top", "write-blocking", 200),
    "blocking-none": lambda s, d, r: mirror_case(s, d, r, "none", "write-blocking", 200),
    # A granularity below the target's cluster size: copies must not leave a cluster half
    # filled from a backing file that is not linked during the job.
    "granularity-top": lambda s, d, r: mirror_case(s, d, r, "top", "background", 80,
                                                   extra={"granularity": 4096, "buf-size": 65536}),
    "granularity-blocking-none": lambda s, d, r: mirror_case(s, d, r, "none", "write-blocking", 80,
                                                             extra={"granularity": 8192}),
    # mode=existing: the target was made by the user with the right backing file and a
    # cluster size of 1 MiB (above the default granularity).
    "existing-top": lambda s, d, r: mirror_case(s, d, r, "top", "write-blocking", 80,
                                                existing=["-o", "cluster_size=1M"]),
    "existing-none": lambda s, d, r: mirror_case(s, d, r, "none", "background", 80,
                                                 existing=["-o", "cluster_size=1M"]),
    # An NBD target (qemu-nbd serving an image with the right backing file).
    "nbd-top": lambda s, d, r: mirror_case(s, d, r, "top", "write-blocking", 80, existing="nbd"),
    "nbd-full": lambda s, d, r: mirror_case(s, d, r, "full", "background", 80, existing="nbd"),
}


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("socket")
    ap.add_argument("workdir")
    ap.add_argument("case", choices=sorted(CASES))
    ap.add_argument("--seed", type=int, default=int(time.time()) % 100000)
    a = ap.parse_args()
    d = a.workdir
    rng = random.Random(a.seed)
    async with Session(a.socket, d) as s:
        model, backings, checked = await CASES[a.case](s, d, rng)
    await asyncio.sleep(0.1)
    # Offline: the files, through their recorded backing chains, hold the model's bytes.
    for name, want in backings.items():
        got = backing_of(f"{d}/{name}")
        if (got and os.path.realpath(got)) != (want and os.path.realpath(want)):
            raise AssertionError(f"{name}: backing file {got!r}, expected {want!r}")
    top = checked[0]
    expect_same(f"{top} read offline through its backing chain",
                read_all(f"{d}/{top}", "qcow2", f"{d}/offline.raw", uncached=True), bytes(model.data))
    for name in checked:
        check(f"{d}/{name}")
    extra = {}
    if a.case == "cor":
        # The filter copied what it read into top: top alone now holds the base's data.
        m = json.loads(sh("qemu-img", "map", "-U", "--output=json", f"{d}/src.qcow2"))
        extra["top_depth0_bytes"] = sum(e["length"] for e in m if e["depth"] == 0 and e["data"])
        if extra["top_depth0_bytes"] < 24 * MiB:
            raise AssertionError(f"copy-on-read copied only {extra['top_depth0_bytes']} bytes into top, expected 24 MiB")
    print(json.dumps({"ok": True, "case": a.case, "seed": a.seed, **extra}), flush=True)


asyncio.run(main())
