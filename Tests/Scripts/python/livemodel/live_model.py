#!/usr/bin/env python3
"""Randomized live-operations model test for QMP block daemons.

Usage:
  live_model.py DAEMON_KIND WORKDIR --seed N --steps K [--daemon-cmd CMD] [--exclude TAGS]
                [--replay FILE.json] [--shrink-seconds S] [--size MIB] [--keep]

DAEMON_KIND
  qblock  QBlock's `nbd --qmp SOCKET` (binary: --daemon-cmd, else $QBLOCK_NBD, else `nbd` on PATH)
  qsd     qemu-storage-daemon (--daemon-cmd overrides the binary)
  diff    the same step list against qblock and then qsd: qblock must agree with the model;
          where qsd disagrees with the model that is reported as a QEMU deviation; where both
          agree, the chains the two daemons leave are compared (backing files, guest-visible
          bytes, and the depth-0 allocation of every image, with legitimate differences noted).

What it does: starts the daemon, builds a small qcow2 chain (the base and a middle image hold
data written offline by qemu-io), adds it with blockdev-add, exports the top node writable
over NBD, and runs K random steps: writer bursts (writes, write-zeroes, discards; sub-cluster
and unaligned; several requests in flight) through the export, live snapshots (sync, and
blockdev-add + blockdev-snapshot, also inside `transaction`, also an aborted transaction),
block-stream (no base, base, base-node), block-commit (intermediate; active, completed or
cancelled after ready), copy-on-read filter reads (through their own read-only export, with
and without `bottom`), drive-mirror / blockdev-mirror in every combination of sync x copy-mode
x mode x granularity/buf-size, with writer bursts, pause/resume and set-speed during the job,
ended by complete (pivot), cancel after ready, or forced cancel.

A byte model of every image file (its own clusters and its backing image) is updated as the
QAPI documentation describes each operation. After every step the export must read as the
model's view of the active chain; after every step that is not a burst each image file still
meant to be valid is checked offline (qemu-img info --backing-chain -U for the recorded backing
names, qemu-img compare -U against a raw file the model writes) and every image with
qemu-img check -U. At the end the daemon is quit and everything is checked once more.

On failure the step list is shrunk (steps dropped, bursts shortened, while the same kind of
failure remains) and a reproducer is printed: the seed, the minimal step list as JSON (feed it
back with --replay) and the QMP commands it sent. Exit status: 0 pass, 1 failure, 3 missing
python qemu.qmp or daemon.

Step tags for --exclude (comma separated; a step is dropped when any of its tags is listed):
  burst snapshot transaction stream commit active-commit cor mirror drive-mirror
  blockdev-mirror sync-full sync-top sync-none background write-blocking
  write-blocking:top write-blocking:none drive-mirror:none cancel pause speed discard
"""
import argparse
import asyncio
import copy
import json
import logging
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

logging.getLogger("asyncio").setLevel(logging.CRITICAL)
logging.getLogger("qemu").setLevel(logging.CRITICAL)

try:
    from qemu.qmp import QMPClient
    from qemu.qmp import ExecuteError
except ImportError:
    print("live_model: python qemu.qmp not installed (pip install qemu.qmp); skipped", flush=True)
    sys.exit(3)

MiB = 1 << 20
JOB_TIMEOUT = 60.0      # any single wait for a job event
QMP_TIMEOUT = 30.0      # any single QMP command
NBD_TIMEOUT = 30.0      # any single NBD request
TOOL_TIMEOUT = 60.0     # any qemu-img / qemu-io run


class Failure(Exception):
    """A check or an operation failed: `kind` classifies it (used to keep shrinking on the same bug)."""

    def __init__(self, kind, message):
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


class Skip(Exception):
    """A step whose preconditions do not hold in the current state: a no-op."""


# --------------------------------------------------------------------------- NBD client

class NBDClient:
    """A minimal fixed-newstyle NBD client (NBD_OPT_GO, simple replies), blocking sockets."""
    CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_WRITE_ZEROES = 0, 1, 2, 3, 4, 6
    FLAG_FUA, FLAG_NO_HOLE = 1, 2

    def __init__(self, path, name, structured=True):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(NBD_TIMEOUT)
        self.s.connect(path)
        self.handle = 0
        magic, opt_magic, hflags = struct.unpack(">QQH", self._recv(18))
        if magic != 0x4E42444D41474943 or opt_magic != 0x49484156454F5054:
            raise Failure("nbd-error", "bad NBD greeting")
        self.s.sendall(struct.pack(">I", 3 if hflags & 2 else 1))   # FIXED_NEWSTYLE | NO_ZEROES
        # Structured replies, as QEMU's client asks: reads may then come back as data and hole chunks.
        self.structured = False
        if structured:
            self.s.sendall(struct.pack(">QII", 0x49484156454F5054, 8, 0))   # NBD_OPT_STRUCTURED_REPLY
            rmagic, _opt, rtype, rlen = struct.unpack(">QIII", self._recv(20))
            self._recv(rlen)
            self.structured = rtype == 1
        n = name.encode()
        data = struct.pack(">I", len(n)) + n + struct.pack(">H", 0)
        self.s.sendall(struct.pack(">QII", 0x49484156454F5054, 7, len(data)) + data)  # NBD_OPT_GO
        self.size = None
        while True:
            rmagic, _opt, rtype, rlen = struct.unpack(">QIII", self._recv(20))
            payload = self._recv(rlen)
            if rmagic != 0x3E889045565A9:
                raise Failure("nbd-error", "bad option reply magic")
            if rtype & 0x80000000:
                raise Failure("nbd-error", f"NBD_OPT_GO refused for {name!r}: type {rtype:#x} {payload!r}")
            if rtype == 3 and len(payload) >= 12 and struct.unpack(">H", payload[:2])[0] == 0:
                self.size = struct.unpack(">Q", payload[2:10])[0]
            if rtype == 1:
                break

    def _recv(self, n):
        buf = bytearray()
        while len(buf) < n:
            chunk = self.s.recv(n - len(buf))
            if not chunk:
                raise Failure("nbd-error", "NBD server closed the connection")
            buf += chunk
        return bytes(buf)

    def _send(self, cmd, off, length, flags=0, data=b""):
        self.handle += 1
        self.s.sendall(struct.pack(">IHHQQI", 0x25609513, flags, cmd, self.handle, off, length) + data)
        return self.handle

    def _reply(self, expect_len_by_handle):
        magic = struct.unpack(">I", self._recv(4))[0]
        if magic == 0x67446698:                       # simple reply
            err, handle = struct.unpack(">IQ", self._recv(12))
            n = expect_len_by_handle.get(handle, 0)
            return handle, err, (self._recv(n) if err == 0 and n else b"")
        if magic != 0x668E33EF:
            raise Failure("nbd-error", f"bad reply magic {magic:#x}")
        # Structured: chunks until one with the DONE flag; a read is assembled from data and holes.
        handle, err, buf = None, 0, None
        while True:
            if magic != 0x668E33EF:
                raise Failure("nbd-error", f"bad structured reply magic {magic:#x}")
            flags, rtype, handle, length = struct.unpack(">HHQI", self._recv(16))
            payload = self._recv(length)
            n = expect_len_by_handle.get(handle, 0)
            if buf is None:
                buf = bytearray(n)
                base = self.read_offsets.get(handle, 0)
            if rtype == 1:                             # OFFSET_DATA
                off = struct.unpack(">Q", payload[:8])[0] - base
                buf[off:off + length - 8] = payload[8:]
            elif rtype == 2:                           # OFFSET_HOLE
                off, hl = struct.unpack(">QI", payload[:12])
                buf[off - base:off - base + hl] = bytes(hl)
            elif rtype & 0x8000:                       # errors
                err = struct.unpack(">I", payload[:4])[0] or 5
            if flags & 1:
                return handle, err, bytes(buf) if n else b""
            magic = struct.unpack(">I", self._recv(4))[0]

    def run(self, ops):
        """Sends `ops` (tuples (cmd, off, len, flags, data)) all at once, then collects the replies.
        Returns {index: data} for reads; raises on any error."""
        handles, lens = {}, {}
        self.read_offsets = {}
        for i, (cmd, off, length, flags, data) in enumerate(ops):
            h = self._send(cmd, off, length, flags, data)
            handles[h] = i
            if cmd == self.CMD_READ:
                lens[h] = length
                self.read_offsets[h] = off
        out = {}
        for _ in ops:
            h, err, data = self._reply(lens)
            if err:
                cmd, off, length = ops[handles[h]][:3]
                raise Failure("nbd-error", f"NBD command {cmd} at {off}+{length} failed with error {err}")
            out[handles[h]] = data
        return out

    def read(self, off, length):
        out = bytearray()
        step = 4 * MiB
        for o in range(off, off + length, step):
            n = min(step, off + length - o)
            out += self.run([(self.CMD_READ, o, n, 0, b"")])[0]
        return bytes(out)

    def flush(self):
        self.run([(self.CMD_FLUSH, 0, 0, 0, b"")])

    def close(self):
        try:
            self._send(self.CMD_DISC, 0, 0)
        except OSError:
            pass
        self.s.close()


# --------------------------------------------------------------------------- the model

class Image:
    """One image file: its own clusters (index -> bytes of one cluster) and its backing image."""

    def __init__(self, name, path, cluster, backing):
        self.name, self.path, self.cluster, self.backing = name, path, cluster, backing
        self.node = name
        self.clusters = {}
        self.version = 0
        self.owned = False        # added by blockdev-add and still open: we must blockdev-del it
        self.state = "live"       # live | frozen (valid while its chain is unchanged) | invalid | garbage
        self.stamp = None

    def __repr__(self):
        return f"<{self.name}>"


class Model:
    def __init__(self, size):
        self.size = size
        self.images = {}
        self.active = None
        self.journal = None       # byte ranges written to the active image while a job runs

    def chain(self, img):
        out = []
        while img is not None:
            out.append(img)
            img = img.backing
        return out

    def stamp(self, img):
        return tuple((i.name, i.version) for i in self.chain(img))

    def read(self, img, off, n):
        """What `img`'s chain shows at off..off+n."""
        if img is None:
            return bytearray(n)
        out = self.read(img.backing, off, n)
        cs = img.cluster
        for c in range(off // cs, (off + n - 1) // cs + 1):
            data = img.clusters.get(c)
            if data is None:
                continue
            lo, hi = max(off, c * cs), min(off + n, (c + 1) * cs)
            out[lo - off:hi - off] = data[lo - c * cs:hi - c * cs]
        return out

    def view(self, img):
        return self.read(img, 0, self.size)

    def write(self, img, off, data):
        """A guest write into `img`: an unallocated cluster is first filled from the backing chain."""
        cs = img.cluster
        n = len(data)
        for c in range(off // cs, (off + n - 1) // cs + 1):
            cur = img.clusters.get(c)
            if cur is None:
                cur = self.read(img.backing, c * cs, cs)
            lo, hi = max(off, c * cs), min(off + n, (c + 1) * cs)
            cur[lo - c * cs:hi - c * cs] = data[lo - off:hi - off]
            img.clusters[c] = cur
        img.version += 1
        if img is self.active and self.journal is not None:
            self.journal.append((off, n))

    def allocated_ranges(self, img):
        return [(c * img.cluster, img.cluster) for c in sorted(img.clusters)]

    def fill_from_view(self, img, ranges, source):
        """Makes `img` allocate every cluster touching `ranges` with what `source`'s chain shows."""
        cs = img.cluster
        cl = set()
        for off, n in ranges:
            cl.update(range(off // cs, (off + n - 1) // cs + 1))
        for c in cl:
            img.clusters[c] = self.read(source, c * cs, cs)
        img.version += 1

    def live_chain(self):
        return self.chain(self.active)

    def settle(self):
        """After a step: images that left the active chain are frozen with their chain's stamp;
        frozen images whose chain changed since are no longer meant to be valid."""
        live = set(self.live_chain())
        for img in self.images.values():
            if img in live:
                img.state, img.stamp = "live", None
            elif img.state == "live":
                img.state, img.stamp = "frozen", self.stamp(img)
            elif img.state == "frozen" and self.stamp(img) != img.stamp:
                img.state = "invalid"


# --------------------------------------------------------------------------- step generation

GRANULARITIES = [None, 4096, 16384, 65536, 131072]
BUF_SIZES = [None, 65536, 262144, 1048576]
CLUSTERS = [65536, 65536, 32768, 131072]


def gen_burst(rng, size, cluster=65536, nmax=8):
    ops, used = [], []
    for _ in range(rng.randint(1, nmax)):
        for _try in range(20):
            shape = rng.random()
            if shape < 0.35:       # sub-cluster, sector aligned
                length = 512 * rng.randint(1, cluster // 512 - 1)
                off = 512 * rng.randrange(0, (size - length) // 512)
            elif shape < 0.55:     # sub-cluster, byte unaligned
                length = rng.randint(1, cluster)
                off = rng.randrange(0, size - length)
            elif shape < 0.80:     # spanning clusters, unaligned to clusters
                length = 512 * rng.randint(cluster // 512, 6 * cluster // 512)
                off = 512 * rng.randrange(0, (size - length) // 512)
            else:                  # cluster aligned
                length = cluster * rng.randint(1, 8)
                off = cluster * rng.randrange(0, (size - length) // cluster)
            if all(off + length <= o or o + n <= off for o, n in used):
                break
        else:
            continue
        used.append((off, length))
        r = rng.random()
        if r < 0.6:
            ops.append(["write", off, length, rng.randint(1, 255)])
        elif r < 0.8:
            ops.append(["zero", off, length, rng.random() < 0.5])
        else:
            ops.append(["discard", off, length])
    return ops


def gen_step(rng, size):
    r = rng.random()
    burst = lambda n=6: gen_burst(rng, size, nmax=n)
    if r < 0.22:
        return {"kind": "burst", "ops": burst(8)}
    if r < 0.30:
        return {"kind": "snapshot-sync"}
    if r < 0.36:
        return {"kind": "snapshot", "cluster": rng.choice(CLUSTERS)}
    if r < 0.41:
        return {"kind": "transaction", "action": rng.choice(["sync", "blockdev"]),
                "abort": rng.random() < 0.3, "cluster": rng.choice(CLUSTERS)}
    if r < 0.49:
        return {"kind": "stream", "base": rng.choice(["none", "node", "file"]), "pick": rng.random(),
                "speed": rng.random() < 0.5, "pause": rng.random() < 0.3, "burst": burst(4)}
    if r < 0.55:
        return {"kind": "commit", "pick_top": rng.random(), "pick_base": rng.random(),
                "speed": rng.random() < 0.5, "burst": burst(4)}
    if r < 0.62:
        return {"kind": "active-commit", "pick_base": rng.random(), "end": rng.choice(["complete", "complete", "cancel"]),
                "pause": rng.random() < 0.3, "burst": burst(4), "burst2": burst(3)}
    if r < 0.70:
        return {"kind": "cor", "bottom": rng.random() if rng.random() < 0.4 else None,
                "reads": [[c[1], c[2]] for c in gen_burst(rng, size, nmax=6)]}
    # blockdev-mirror keeps the target's backing as opened, and its source must stay a root
    # node, so sync=none (whose target must be backed by the source) is a drive-mirror case.
    cmd = rng.choice(["drive", "blockdev"])
    return {"kind": "mirror", "cmd": cmd, "sync": rng.choice(["full", "top", "none"] if cmd == "drive" else ["full", "top"]),
            "copy_mode": rng.choice(["background", "write-blocking"]), "mode": rng.choice(["absolute-paths", "existing"]),
            "granularity": (g := rng.choice(GRANULARITIES)), "buf_size": (b if (b := rng.choice(BUF_SIZES)) is None or b >= (g or 0) else None), "cluster": rng.choice(CLUSTERS),
            "end": rng.choice(["complete", "complete", "cancel", "force"]), "speed": rng.random() < 0.4,
            "pause": rng.random() < 0.3, "burst": burst(5), "burst2": burst(4)}


def step_tags(st):
    k = st["kind"]
    tags = {k}
    if k in ("snapshot-sync", "snapshot"):
        tags.add("snapshot")
    if k == "transaction":
        tags |= {"snapshot"}
    bursts = [st.get(b) or [] for b in ("ops", "burst", "burst2")]
    if any(op[0] == "discard" for b in bursts for op in b):
        tags.add("discard")
    if st.get("speed"):
        tags.add("speed")
    if st.get("pause"):
        tags.add("pause")
    if k == "mirror":
        cmd = "drive-mirror" if st["cmd"] == "drive" else "blockdev-mirror"
        tags |= {cmd, "sync-" + st["sync"], st["copy_mode"], f"{st['copy_mode']}:{st['sync']}", f"{cmd}:{st['sync']}"}
        if st["end"] != "complete":
            tags.add("cancel")
    if k == "active-commit" and st["end"] == "cancel":
        tags.add("cancel")
    if k == "crash-mirror":
        tags |= {"crash", "mirror", st["copy_mode"]}
    return tags


def gen_crash(rng, size):
    """The last step of some runs: a mirror with a persistent bitmap (x-bitmap-file, ours
    only) killed with SIGKILL, then finished offline with `img mirror-finish`."""
    return {"kind": "crash-mirror", "copy_mode": rng.choice(["background", "write-blocking"]),
            "ready": rng.random() < 0.5, "slow": rng.random() < 0.5,
            "burst": gen_burst(rng, size, nmax=6), "burst2": gen_burst(rng, size, nmax=4)}


def generate(seed, steps, size, exclude):
    rng = random.Random(seed)
    out = []
    while len(out) < steps:
        st = gen_step(rng, size)
        if step_tags(st) & exclude:
            continue
        out.append(st)
    crash = random.Random(seed * 31 + 7)
    if steps > 0 and "crash" not in exclude and crash.random() < 0.3:
        out[-1] = gen_crash(crash, size)
    return out


# --------------------------------------------------------------------------- tools

def tool(argv, check=True):
    p = subprocess.run(argv, capture_output=True, text=True, timeout=TOOL_TIMEOUT)
    if check and p.returncode != 0:
        raise Failure("tool", f"{' '.join(argv)} exited {p.returncode}: {p.stderr.strip()}")
    return p


def create_qcow2(path, size, cluster, backing=None):
    argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster}"]
    if backing:
        argv += ["-u", "-b", backing, "-F", "qcow2"]
    tool(argv + [path, str(size)])


# --------------------------------------------------------------------------- one run

class Run:
    """One run of a step list against one daemon, with the model and the checks."""

    def __init__(self, kind, workdir, seed, steps, size, daemon_cmd, verbose=True, allow_leaks=False):
        self.kind, self.dir, self.seed, self.steps = kind, workdir, seed, steps
        self.size, self.daemon_cmd, self.verbose = size, daemon_cmd, verbose
        self.model = Model(size)
        self.qmp_log = []
        self.events = []
        self.proc = None
        self.qmp = None
        self.nbd = None
        self.counter = 0
        self.step_index = -1
        self.notes = []
        self.deferred = set()
        self.allow_leaks = allow_leaks

    # ---- plumbing
    def log(self, msg):
        if self.verbose:
            print(f"[{self.kind} seed={self.seed}] {msg}", flush=True)

    def path(self, name):
        return os.path.join(self.dir, name)

    def new_name(self, prefix="img"):
        self.counter += 1
        return f"{prefix}{self.counter}"

    async def start_daemon(self):
        os.makedirs(self.dir, exist_ok=True)
        sock = self.path("qmp.sock")
        self.daemon_log = open(self.path("daemon.log"), "w")
        if self.kind == "qsd":
            argv = [self.daemon_cmd or "qemu-storage-daemon", "--chardev", f"socket,path={sock},server=on,wait=off,id=m",
                    "--monitor", "chardev=m"]
        else:
            argv = [self.daemon_cmd or os.environ.get("QBLOCK_NBD") or "nbd", "--qmp", sock]
        try:
            self.proc = subprocess.Popen(argv, stdout=self.daemon_log, stderr=subprocess.STDOUT, start_new_session=True)
        except FileNotFoundError:
            print(f"live_model: daemon {argv[0]} not found; skipped", flush=True)
            sys.exit(3)
        deadline = time.monotonic() + 15
        while not os.path.exists(sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise Failure("daemon", f"{argv[0]} did not start: {self.daemon_tail()}")
            await asyncio.sleep(0.01)
        for attempt in range(50):
            self.qmp = QMPClient(f"live-model-{self.kind}")
            try:
                await asyncio.wait_for(self.qmp.connect(sock), 10)
                break
            except Exception as e:      # the socket file may exist a moment before it listens
                if attempt == 49 or self.proc.poll() is not None:
                    raise Failure("daemon", f"cannot connect to {sock}: {e!r} {self.daemon_tail()}")
                await asyncio.sleep(0.05)
        self.collector = asyncio.create_task(self.collect())

    def daemon_tail(self):
        try:
            with open(self.path("daemon.log")) as f:
                return f.read()[-2000:]
        except OSError:
            return ""

    async def collect(self):
        try:
            async for ev in self.qmp.events:
                self.events.append(dict(ev))
        except Exception:
            pass

    async def x(self, cmd, args=None, expect_error=False, tolerate=False):
        self.qmp_log.append({"execute": cmd, "arguments": args} if args is not None else {"execute": cmd})
        if self.proc.poll() is not None:
            raise Failure("daemon-died", f"daemon exited with {self.proc.returncode}: {self.daemon_tail()}")
        try:
            r = await asyncio.wait_for(self.qmp.execute(cmd, args), QMP_TIMEOUT)
        except ExecuteError as e:
            if expect_error or tolerate:
                return e
            raise Failure("qmp-error", f"{cmd} {json.dumps(args)} failed: {e}")
        except asyncio.TimeoutError:
            raise Failure("timeout", f"{cmd} got no reply within {QMP_TIMEOUT}s")
        except (EOFError, ConnectionError) as e:
            raise Failure("daemon-died", f"{cmd}: connection lost ({e}); {self.daemon_tail()}")
        if expect_error:
            raise Failure("qmp-no-error", f"{cmd} {json.dumps(args)} succeeded but was expected to fail")
        return r

    async def wait_event(self, pred, what, timeout=JOB_TIMEOUT):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i, ev in enumerate(self.events):
                if pred(ev):
                    return self.events.pop(i)
            if self.proc.poll() is not None:
                raise Failure("daemon-died", f"waiting for {what}: daemon exited {self.proc.returncode}: {self.daemon_tail()}")
            await asyncio.sleep(0.005)
        raise Failure("timeout", f"no {what} within {timeout}s (events: {[e['event'] for e in self.events][-10:]})")

    async def nbd_call(self, fn, *args):
        try:
            return await asyncio.wait_for(asyncio.to_thread(fn, *args), NBD_TIMEOUT * 2)
        except asyncio.TimeoutError:
            raise Failure("timeout", "NBD request got no reply")
        except OSError as e:
            raise Failure("nbd-error", f"NBD: {e}")

    # ---- setup
    async def setup(self):
        await self.start_daemon()
        rng = random.Random(self.seed * 7919 + 1)
        m = self.model
        size = self.size
        base = Image("img0", self.path("img0.qcow2"), rng.choice(CLUSTERS), None)
        create_qcow2(base.path, size, base.cluster)
        m.images[base.name] = base
        argv = ["qemu-io", "-f", "qcow2"]
        for _ in range(rng.randint(3, 8)):
            length = 512 * rng.randint(1, 2 * MiB // 512)
            off = 512 * rng.randrange(0, (size - length) // 512)
            pat = rng.randint(1, 255)
            argv += ["-c", f"write -P {pat} {off} {length}"]
            m.write(base, off, bytes([pat]) * length)
        tool(argv + [base.path])
        top = base
        for k in range(1, rng.randint(2, 3)):
            img = Image(f"img{k}", self.path(f"img{k}.qcow2"), rng.choice(CLUSTERS), top)
            create_qcow2(img.path, size, img.cluster, top.path)
            m.images[img.name] = img
            argv = ["qemu-io", "-f", "qcow2"]
            for _ in range(rng.randint(0, 5)):
                length = 512 * rng.randint(1, MiB // 512)
                off = 512 * rng.randrange(0, (size - length) // 512)
                if rng.random() < 0.75:
                    pat = rng.randint(1, 255)
                    argv += ["-c", f"write -P {pat} {off} {length}"]
                    m.write(img, off, bytes([pat]) * length)
                else:
                    argv += ["-c", f"write -z {off} {length}"]
                    m.write(img, off, bytes(length))
            tool(argv + [img.path])
            top = img
        self.counter = len(m.images) - 1
        for img in m.chain(top)[::-1]:
            args = {"driver": "qcow2", "node-name": img.node, "discard": "unmap",
                    "file": {"driver": "file", "filename": img.path}}
            args["backing"] = img.backing.node if img.backing else None
            await self.x("blockdev-add", args)
            img.owned = True
        m.active = top
        m.settle()
        await self.x("nbd-server-start", {"addr": {"type": "unix", "data": {"path": self.path("nbd.sock")}}})
        await self.x("block-export-add", {"type": "nbd", "id": "exp", "node-name": top.node, "writable": True, "name": "disk"})
        self.nbd = await self.nbd_call(NBDClient, self.path("nbd.sock"), "disk")
        if self.nbd.size != size:
            raise Failure("nbd-error", f"export size {self.nbd.size} != {size}")

    # ---- writer bursts
    async def burst(self, ops):
        """Sends the (non-overlapping) ops with up to 4 in flight and applies them to the model;
        a discard may leave each byte as it was or make it zero: the export decides, then the model follows."""
        if not ops:
            return
        m = self.model
        before = {}
        wire = []
        for op in ops:
            kind, off, length = op[0], op[1], op[2]
            if kind == "write":
                wire.append((NBDClient.CMD_WRITE, off, length, 0, bytes([op[3]]) * length))
                m.write(m.active, off, bytes([op[3]]) * length)
            elif kind == "zero":
                wire.append((NBDClient.CMD_WRITE_ZEROES, off, length, NBDClient.FLAG_NO_HOLE if op[3] else 0, b""))
                m.write(m.active, off, bytes(length))
            else:
                before[(off, length)] = bytes(m.read(m.active, off, length))
                wire.append((NBDClient.CMD_TRIM, off, length, 0, b""))
        for i in range(0, len(wire), 4):
            await self.nbd_call(self.nbd.run, wire[i:i + 4])
        for (off, length), old in before.items():
            now = await self.nbd_call(self.nbd.read, off, length)
            j = 0
            while j < length:
                if now[j] == old[j]:
                    j += 1
                    continue
                if now[j] != 0:
                    raise Failure("discard-garbage", f"after a discard of {off}+{length}, byte {off + j} reads {now[j]:#x}: "
                                  f"neither the old {old[j]:#x} nor zero")
                k = j
                while k < length and now[k] == 0 and old[k] != 0:
                    k += 1
                m.write(m.active, off + j, bytes(k - j))
                j = k

    # ---- checks
    async def check_export(self, what="export"):
        want = self.model.view(self.model.active)
        got = await self.nbd_call(self.nbd.read, 0, self.size)
        if got != want:
            raise Failure("export-mismatch", f"{what}: {self.describe_diff(got, want)} (active {self.model.active.name}, "
                          f"chain {[i.name for i in self.model.live_chain()]})")

    @staticmethod
    def describe_diff(got, want, gran=4096):
        bad = [o for o in range(0, len(want), gran) if got[o:o + gran] != want[o:o + gran]]
        o = bad[0]
        j = next(i for i in range(o, o + gran) if got[i] != want[i])
        return (f"{len(bad)} 4 KiB blocks differ, first at byte {j}: read {got[j]:#x} model {want[j]:#x}; "
                f"blocks {[b // gran for b in bad[:12]]}{'...' if len(bad) > 12 else ''}")

    async def check_offline(self, final=False):
        """Every image: no corruption; every image still meant to be valid: recorded backing chain
        and content equal the model's."""
        m = self.model
        if not final:
            await self.nbd_call(self.nbd.flush)
            for img in m.live_chain()[1:]:
                await self.flush_node(img)
            nodes = await self.x("query-named-block-nodes", {"flat": True})
            opened = {n["node-name"] for n in nodes}
            live = set(m.live_chain())
            leaked = [i for i in m.images.values() if i not in live and not i.owned and i.node in opened]
            if leaked and not self.allow_leaks:
                raise Failure("leaked-node", f"nodes {[i.node for i in leaked]} left the active chain and nothing uses them, "
                              "but the daemon keeps them open (QEMU closes such implicitly opened nodes, which flushes them)")
            self.deferred = {i.name for i in leaked}
        for img in m.images.values():
            if not os.path.exists(img.path) or (not final and img.name in self.deferred):
                continue
            p = tool(["qemu-img", "check", "-U", "-f", "qcow2", "--output=json", img.path], check=False)
            if p.returncode not in (0, 3):
                raise Failure("corruption", f"qemu-img check {img.name}: exit {p.returncode} {p.stdout.strip()[:400]} {p.stderr.strip()[:400]}")
            if p.returncode == 3 and final:
                self.notes.append(f"{img.name}: leaked clusters after quit")
            if img.state not in ("live", "frozen"):
                continue
            info = tool(["qemu-img", "info", "-U", "--backing-chain", "--output=json", img.path])
            chain = [e["filename"] for e in json.loads(info.stdout)]
            want = [i.path for i in m.chain(img)]
            if chain != want:
                raise Failure("backing-mismatch", f"{img.name} ({img.state}): file chain {[os.path.basename(c) for c in chain]} "
                              f"!= model {[os.path.basename(c) for c in want]}")
            ref = self.path("model.raw")
            with open(ref, "wb") as f:
                f.write(m.view(img))
            p = tool(["qemu-img", "compare", "-U", "-f", "raw", "-F", "qcow2", ref, img.path], check=False)
            if p.returncode != 0:
                opened = "?"
                if not final:
                    nodes = await self.x("query-named-block-nodes", {"flat": True})
                    opened = sorted({n["node-name"] for n in nodes if n.get("drv") == "qcow2"})
                raise Failure("image-mismatch", f"{img.name} ({img.state}, chain {[i.name for i in m.chain(img)]}) offline: "
                              f"{(p.stdout + p.stderr).strip()[:300]} (qcow2 nodes open in the daemon: {opened})")

    async def flush_node(self, img):
        """Flushes a node that is not the export's (a backing image a commit wrote into keeps its
        metadata in its caches): a temporary read-only export of it takes an NBD flush."""
        exp = "flush-" + img.node
        await self.x("block-export-add", {"type": "nbd", "id": exp, "node-name": img.node, "writable": False, "name": exp})
        cli = await self.nbd_call(NBDClient, self.path("nbd.sock"), exp)
        try:
            await self.nbd_call(cli.flush)
        finally:
            await self.nbd_call(cli.close)
        await self.del_export(exp)

    async def del_export(self, exp):
        """block-export-del (safe mode) once the server has seen our client go: a refusal
        'still in use' right after the disconnect is retried for up to 5 s."""
        deadline = time.monotonic() + 5
        while True:
            r = await self.x("block-export-del", {"id": exp}, tolerate=True)
            if not isinstance(r, ExecuteError):
                break
            if "still in use" not in str(r) or time.monotonic() > deadline:
                raise Failure("qmp-error", f"block-export-del {exp}: {r}")
            await asyncio.sleep(0.01)
        await self.wait_event(lambda e: e["event"] == "BLOCK_EXPORT_DELETED" and e["data"].get("id") == exp,
                              f"export {exp} deleted", 10)

    async def release_dropped(self):
        """Nodes we added that no longer serve the active chain are deleted, which flushes and
        closes them (an open node's metadata may still sit in its caches); overlays go first."""
        live = set(self.model.live_chain())
        todo = [i for i in self.model.images.values() if i.owned and i not in live]
        errors = {}
        while todo:
            progress = False
            for img in list(todo):
                if any(o.backing is img and (o.owned or o in live) and o is not img for o in self.model.images.values()):
                    continue
                r = await self.x("blockdev-del", {"node-name": img.node}, tolerate=True)
                todo.remove(img)
                progress = True
                if isinstance(r, ExecuteError):
                    errors[img.node] = str(r)
                else:
                    img.owned = False
            if not progress:
                break
        for node, e in errors.items():
            if f"blockdev-del {node}: {e}" not in self.notes:
                self.notes.append(f"blockdev-del {node}: {e}")

    # ---- helpers for steps
    def pick(self, seq, r):
        if not seq:
            raise Skip("nothing to pick")
        return seq[min(int(r * len(seq)), len(seq) - 1)]

    async def wait_job_end(self, job):
        ev = await self.wait_event(lambda e: e["event"] in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")
                                   and e["data"].get("device") == job, f"end of job {job}")
        await self.wait_event(lambda e: e["event"] == "JOB_STATUS_CHANGE" and e["data"].get("id") == job
                              and e["data"].get("status") == "null", f"job {job} dismissed")
        return ev

    async def wait_status(self, job, statuses):
        deadline = time.monotonic() + JOB_TIMEOUT
        while time.monotonic() < deadline:
            jobs = await self.x("query-block-jobs")
            st = next((j.get("status") for j in jobs if j["device"] == job), None)
            if st in statuses or st is None:
                return st
            await asyncio.sleep(0.01)
        raise Failure("timeout", f"job {job} never reached {statuses}")

    async def pause_burst_resume(self, job, ops):
        await self.x("block-job-pause", {"device": job}, tolerate=True)
        st = await self.wait_status(job, ("paused", "standby"))
        await self.burst(ops)
        if st is not None:
            await self.x("block-job-resume", {"device": job}, tolerate=True)

    def overlay_args(self, img):
        return {"driver": "qcow2", "node-name": img.node, "discard": "unmap",
                "file": {"driver": "file", "filename": img.path}, "backing": None}

    # ---- steps
    async def step_burst(self, st):
        await self.burst(st["ops"])

    async def step_snapshot_sync(self, st):
        m = self.model
        if len(m.live_chain()) >= 6:
            raise Skip("chain long enough")
        old = m.active
        img = Image(self.new_name(), None, 65536, old)
        img.path = self.path(img.name + ".qcow2")
        await self.x("blockdev-snapshot-sync", {"node-name": old.node, "snapshot-file": img.path,
                                                "snapshot-node-name": img.node, "format": "qcow2"})
        m.images[img.name] = img
        m.active = img

    async def prepare_overlay(self, cluster):
        m = self.model
        old = m.active
        img = Image(self.new_name(), None, cluster, old)
        img.path = self.path(img.name + ".qcow2")
        create_qcow2(img.path, self.size, cluster, old.path)
        await self.x("blockdev-add", self.overlay_args(img))
        img.owned = True
        return old, img

    async def step_snapshot(self, st):
        m = self.model
        if len(m.live_chain()) >= 6:
            raise Skip("chain long enough")
        old, img = await self.prepare_overlay(st["cluster"])
        await self.x("blockdev-snapshot", {"node": old.node, "overlay": img.node})
        m.images[img.name] = img
        m.active = img

    async def step_transaction(self, st):
        m = self.model
        if len(m.live_chain()) >= 6:
            raise Skip("chain long enough")
        if st["action"] == "sync":
            old = m.active
            img = Image(self.new_name(), None, 65536, old)
            img.path = self.path(img.name + ".qcow2")
            action = {"type": "blockdev-snapshot-sync", "data": {"node-name": old.node, "snapshot-file": img.path,
                                                                 "snapshot-node-name": img.node, "format": "qcow2"}}
        else:
            old, img = await self.prepare_overlay(st["cluster"])
            action = {"type": "blockdev-snapshot", "data": {"node": old.node, "overlay": img.node}}
        actions = [action] + ([{"type": "abort", "data": {}}] if st["abort"] else [])
        if st["abort"]:
            await self.x("transaction", {"actions": actions}, expect_error=True)
            if st["action"] == "blockdev":
                await self.x("blockdev-del", {"node-name": img.node})
                img.owned = False
                os.unlink(img.path)
            elif os.path.exists(img.path):
                os.unlink(img.path)     # QEMU leaves the created file behind; it is not part of anything
            return
        await self.x("transaction", {"actions": actions})
        m.images[img.name] = img
        m.active = img

    async def step_stream(self, st):
        m = self.model
        chain = m.live_chain()
        top = m.active
        if len(chain) < 2:
            raise Skip("no backing to stream")
        job = "stream" + str(self.counter)
        args = {"job-id": job, "device": top.node}
        base = None
        if st["base"] != "none":
            if len(chain) < 3:
                raise Skip("no image between top and a base")
            base = self.pick(chain[2:], st["pick"])
            if st["base"] == "node":
                args["base-node"] = base.node
            else:
                args["base"] = base.path
        if st["speed"]:
            args["speed"] = 4 * MiB
        await self.x("block-stream", args)
        if st["pause"]:
            await self.pause_burst_resume(job, st["burst"])
        else:
            await self.burst(st["burst"])
        if st["speed"]:
            await self.x("block-job-set-speed", {"device": job, "speed": 0}, tolerate=True)
        ev = await self.wait_job_end(job)
        if ev["event"] != "BLOCK_JOB_COMPLETED" or "error" in ev["data"]:
            raise Failure("job-error", f"stream ended with {ev}")
        # The top now holds, in every cluster it did not allocate, what the images above base allocated.
        ranges = []
        for img in chain[1:chain.index(base) if base else len(chain)]:
            ranges += m.allocated_ranges(img)
        cs = top.cluster
        need = set()
        for off, n in ranges:
            need.update(range(off // cs, (off + n - 1) // cs + 1))
        for c in need - set(top.clusters):
            top.clusters[c] = m.read(top, c * cs, cs)
        top.backing = base
        top.version += 1

    async def step_commit(self, st):
        m = self.model
        chain = m.live_chain()
        if len(chain) < 3:
            raise Skip("no intermediate image")
        topimg = self.pick(chain[1:-1], st["pick_top"])
        i = chain.index(topimg)
        base = self.pick(chain[i + 1:], st["pick_base"])
        job = "commit" + str(self.counter)
        args = {"job-id": job, "device": m.active.node, "top-node": topimg.node, "base-node": base.node}
        if st["speed"]:
            args["speed"] = 4 * MiB
        await self.x("block-commit", args)
        await self.burst(st["burst"])
        if st["speed"]:
            await self.x("block-job-set-speed", {"device": job, "speed": 0}, tolerate=True)
        ev = await self.wait_job_end(job)
        if ev["event"] != "BLOCK_JOB_COMPLETED" or "error" in ev["data"]:
            raise Failure("job-error", f"commit ended with {ev}")
        self.commit_into(chain[i:chain.index(base)], base, topimg)
        chain[i - 1].backing = base
        chain[i - 1].version += 1
        for img in chain[i:chain.index(base)]:
            img.state = "invalid"

    def commit_into(self, above, base, view_of):
        m = self.model
        for img in above:
            for off, n in m.allocated_ranges(img):
                m.write(base, off, m.read(view_of, off, n))

    async def step_active_commit(self, st):
        m = self.model
        chain = m.live_chain()
        if len(chain) < 2:
            raise Skip("no base")
        top = m.active
        base = self.pick(chain[1:], st["pick_base"])
        job = "acommit" + str(self.counter)
        await self.x("block-commit", {"job-id": job, "device": top.node, "base-node": base.node})
        await self.burst(st["burst"])
        await self.wait_event(lambda e: e["event"] == "BLOCK_JOB_READY" and e["data"].get("device") == job, f"{job} ready")
        if st["pause"]:
            await self.pause_burst_resume(job, st["burst2"])
        else:
            await self.burst(st["burst2"])
        above = chain[:chain.index(base)]
        await self.end_ready_job(job, st["end"], "active commit")
        self.commit_into(above, base, top)
        if st["end"] == "complete":
            m.active = base
            for img in above:
                img.state = "invalid"

    async def step_cor(self, st):
        m = self.model
        chain = m.live_chain()
        top = m.active
        node = self.new_name("cor")
        args = {"driver": "copy-on-read", "node-name": node, "file": top.node}
        bottom = None
        if st["bottom"] is not None and len(chain) >= 2:
            bottom = self.pick(chain[1:], st["bottom"])
            args["bottom"] = bottom.node
        await self.x("blockdev-add", args)
        await self.x("block-export-add", {"type": "nbd", "id": "exp-" + node, "node-name": node, "writable": False, "name": node})
        cli = await self.nbd_call(NBDClient, self.path("nbd.sock"), node)
        src = chain[1:chain.index(bottom) + 1] if bottom else chain[1:]
        expect = set()
        cs = top.cluster
        try:
            for off, n in st["reads"]:
                want = bytes(m.read(top, off, n))
                got = await self.nbd_call(cli.read, off, n)
                if got != want:
                    raise Failure("cor-read-mismatch", f"copy-on-read read {off}+{n}: {self.describe_diff(got, want, 512)}")
                # Clusters of the top the read touches, that the top does not hold and an image down to
                # bottom does: copied up (whole clusters).
                for c in range(off // cs, (off + n - 1) // cs + 1):
                    if c in top.clusters:
                        continue
                    lo, hi = max(off, c * cs), min(off + n, (c + 1) * cs)
                    if any(self.allocated(img, lo, hi) for img in src):
                        whole = m.read(top, c * cs, cs)
                        if not any(whole[lo - c * cs:hi - c * cs]):
                            # Zeros go out as an NBD hole (qemu-nbd and ours alike): the filter
                            # never sees that read, so nothing is copied — and the top reads
                            # the same either way.
                            continue
                        top.clusters[c] = whole
                        if c * cs >= off and (c + 1) * cs <= off + n:
                            expect.add(c)
            top.version += 1
        finally:
            await self.nbd_call(cli.close)
        await self.del_export("exp-" + node)
        await self.x("blockdev-del", {"node-name": node})
        if expect:
            await self.nbd_call(self.nbd.flush)
            alloc = self.map_depth0(top.path)
            missing = [c for c in sorted(expect) if not any(o <= c * cs and c * cs + cs <= o + n for o, n in alloc)]
            if missing:
                raise Failure("cor-no-copy-up", f"clusters {missing[:10]} of {top.name} (size {cs}) read through the "
                              f"copy-on-read filter were not copied into it ({len(missing)} of {len(expect)})")

    @staticmethod
    def allocated(img, lo, hi):
        cs = img.cluster
        return any(c in img.clusters for c in range(lo // cs, (hi - 1) // cs + 1))

    @staticmethod
    def map_depth0(path):
        p = tool(["qemu-img", "map", "-U", "-f", "qcow2", "--output=json", path])
        return [(e["start"], e["length"]) for e in json.loads(p.stdout) if e.get("depth") == 0 and (e.get("data") or e.get("zero")) and e.get("present", True)]

    async def end_ready_job(self, job, end, what):
        """Completes (end == "complete") or cancels a ready job and waits for a clean end."""
        if end == "complete":
            await self.x("block-job-complete", {"device": job})
        else:
            await self.x("block-job-cancel", {"device": job})
        ev = await self.wait_job_end(job)
        if ev["event"] != "BLOCK_JOB_COMPLETED" or "error" in ev["data"]:
            raise Failure("job-error", f"{what} ended with {ev}")

    async def step_mirror(self, st):
        m = self.model
        src = m.active
        sync = st["sync"]
        tgt = Image(self.new_name(), None, st["cluster"], None)
        tgt.path = self.path(tgt.name + ".qcow2")
        header_backing = {"full": None, "top": src.backing, "none": src}[sync]
        job = "mirror" + str(self.counter)
        args = {"job-id": job, "device": src.node, "sync": sync, "copy-mode": st["copy_mode"]}
        if st["granularity"]:
            args["granularity"] = st["granularity"]
        if st["buf_size"]:
            args["buf-size"] = st["buf_size"]
        if st["speed"]:
            args["speed"] = 8 * MiB
        existing = st["cmd"] == "blockdev" or st["mode"] == "existing"
        if existing:
            create_qcow2(tgt.path, self.size, tgt.cluster, header_backing.path if header_backing else None)
        else:
            tgt.cluster = 65536
        if st["cmd"] == "blockdev":
            # blockdev-mirror leaves the target's backing as the user opened it: open it with the
            # backing the result must have (the source's backing for top, the source for none).
            targs = self.overlay_args(tgt)
            targs["backing"] = header_backing.node if header_backing else None
            await self.x("blockdev-add", targs)
            tgt.owned = True
            args["target"] = tgt.node
            await self.x("blockdev-mirror", args)
        else:
            args.update({"target": tgt.path, "format": "qcow2", "node-name": tgt.node, "mode": st["mode"]})
            await self.x("drive-mirror", args)
        m.images[tgt.name] = tgt
        tgt.backing = header_backing
        tgt.state = "garbage"   # until the job ends well
        m.journal = []
        try:
            if st["pause"]:
                await self.pause_burst_resume(job, st["burst"])
            else:
                await self.burst(st["burst"])
            if st["end"] == "force":
                await self.x("block-job-cancel", {"device": job, "force": True})
                ev = await self.wait_job_end(job)
                if "error" in ev["data"]:
                    raise Failure("job-error", f"mirror ended with {ev}")
                return
            if st["speed"]:
                await self.x("block-job-set-speed", {"device": job, "speed": 0})
            await self.wait_event(lambda e: e["event"] == "BLOCK_JOB_READY" and e["data"].get("device") == job, f"{job} ready")
            await self.burst(st["burst2"])
            await self.end_ready_job(job, st["end"], "mirror")
            # The target holds the source's content; what it allocates depends on sync.
            if sync == "full":
                ranges = [r for img in m.chain(src) for r in m.allocated_ranges(img)]
            elif sync == "top":
                ranges = m.allocated_ranges(src)
            else:
                ranges = list(m.journal)
            m.fill_from_view(tgt, ranges, src)
            tgt.state = "live"
            if st["end"] == "complete":
                m.active = tgt
        finally:
            m.journal = None
        if tgt is not m.active:
            tgt.state, tgt.stamp = "frozen", m.stamp(tgt)

    async def step_crash_mirror(self, st):
        """drive-mirror sync=full with x-bitmap-file; writes, a flush, maybe ready, more writes
        and a flush; then SIGKILL. Offline, `img mirror-finish` must make the target read
        exactly as the source (every write was flushed before the kill), and both images
        must pass qemu-img check. Ends the run (the daemon is gone)."""
        if self.kind == "qsd":
            raise Skip()   # QEMU has no persistent mirror bitmap
        m = self.model
        src = m.active
        tgt = self.path("crash-target.qcow2")
        bitmap = self.path("crash.bitmap")
        args = {"job-id": "crash", "device": src.node, "sync": "full", "target": tgt, "format": "qcow2",
                "mode": "absolute-paths", "copy-mode": st["copy_mode"], "x-bitmap-file": bitmap}
        if st["slow"]:
            args["speed"] = 2 * MiB
        await self.x("drive-mirror", args)
        await self.burst(st["burst"])
        await self.nbd_call(self.nbd.flush)
        if st["ready"]:
            if st["slow"]:
                await self.x("block-job-set-speed", {"device": "crash", "speed": 0})
            await self.wait_event(lambda e: e["event"] == "BLOCK_JOB_READY" and e["data"].get("device") == "crash",
                                  "crash mirror ready")
        await self.burst(st["burst2"])
        await self.nbd_call(self.nbd.flush)
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(15)
        self.crashed = True
        img = os.path.join(os.path.dirname(self.daemon_cmd or shutil.which("nbd") or "nbd"), "img")
        p = tool([img, "mirror-finish", "-b", bitmap, "-f", "qcow2", "-F", "qcow2", src.path, tgt], check=False)
        if p.returncode != 0:
            raise Failure("crash-finish", f"img mirror-finish failed: {(p.stdout + p.stderr).strip()[:300]}")
        want = m.view(src)
        with tempfile.TemporaryDirectory() as t:
            raw = os.path.join(t, "t.raw")
            tool(["qemu-img", "convert", "-U", "-O", "raw", tgt, raw])
            with open(raw, "rb") as f:
                got = f.read()
        if got != want:
            raise Failure("crash-mirror-mismatch", f"target after kill -9 and mirror-finish: {self.describe_diff(got, want)}")
        for path in (src.path, tgt):
            c = tool(["qemu-img", "check", "-U", path], check=False)
            if c.returncode not in (0, 3):   # 3: leaked clusters, which QEMU allows after a crash
                raise Failure("crash-check", f"qemu-img check {os.path.basename(path)} after kill -9: {c.stdout.strip()[:300]}")

    # ---- the run
    async def run(self):
        """Runs every step; returns None, or (step index, Failure)."""
        try:
            await self.setup()
            await self.check_export("after setup")
            await self.check_offline()
            for i, st in enumerate(self.steps):
                self.step_index = i
                t0 = time.monotonic()
                fn = getattr(self, "step_" + st["kind"].replace("-", "_"))
                skipped = False
                try:
                    await fn(st)
                except Skip:
                    skipped = True
                if getattr(self, "crashed", False):
                    self.log(f"step {i:2} {describe(st)}: target complete after kill -9  {time.monotonic() - t0:.2f}s")
                    self.step_index = len(self.steps)
                    return None
                self.model.settle()
                await self.release_dropped()
                await self.check_export(f"after step {i} ({st['kind']})")
                if st["kind"] != "burst" and not skipped:
                    await self.check_offline()
                self.log(f"step {i:2} {describe(st)}{' (skipped)' if skipped else ''}  {time.monotonic() - t0:.2f}s")
            self.step_index = len(self.steps)
            await self.finish()
            return None
        except Failure as f:
            return (self.step_index, f)
        except Exception as e:          # a harness-side surprise is still a failure of this run, not a crash
            return (self.step_index, Failure("harness", f"{type(e).__name__}: {e}"))
        finally:
            await self.cleanup()

    async def finish(self):
        await self.nbd_call(self.nbd.flush)
        await self.nbd_call(self.nbd.close)
        self.nbd = None
        try:
            await self.x("quit")
        except Failure as f:
            if f.kind not in ("daemon-died",):
                raise
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            raise Failure("quit-hang", "daemon did not exit within 15 s of quit")
        if self.proc.returncode != 0:
            raise Failure("quit-status", f"daemon exited {self.proc.returncode} after quit: {self.daemon_tail()}")
        await self.check_offline(final=True)

    async def cleanup(self):
        if self.nbd:
            try:
                self.nbd.s.close()
            except OSError:
                pass
        if self.qmp:
            try:
                await asyncio.wait_for(self.qmp.disconnect(), 5)
            except Exception:
                pass
        if self.proc and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        if getattr(self, "daemon_log", None):
            self.daemon_log.close()


def describe(st):
    k = st["kind"]
    if k == "burst":
        return f"burst of {len(st['ops'])}"
    if k == "mirror":
        return (f"{st['cmd']}-mirror sync={st['sync']} {st['copy_mode']} {st['mode'] if st['cmd'] == 'drive' else ''} "
                f"gran={st['granularity']} buf={st['buf_size']} end={st['end']}{' pause' if st['pause'] else ''}"
                f"{' speed' if st['speed'] else ''}")
    rest = {a: b for a, b in st.items() if a not in ("kind", "ops", "burst", "burst2", "reads")}
    return f"{k} {json.dumps(rest)}"


# --------------------------------------------------------------------------- driver

ALLOW_LEAKS = False


def run_once(kind, workdir, seed, steps, size, daemon_cmd, verbose):
    if os.path.exists(workdir):
        shutil.rmtree(workdir)
    os.makedirs(workdir)
    r = Run(kind, workdir, seed, steps, size, daemon_cmd, verbose, ALLOW_LEAKS)
    res = asyncio.run(r.run())
    return r, res


def shrink(kind, workdir, seed, steps, size, daemon_cmd, sig, budget):
    """Drops steps, then burst ops, while the run still fails with the same signature."""
    deadline = time.monotonic() + budget
    best = steps
    best_run = None
    tries = 0

    def fails(cand):
        nonlocal tries, best_run
        if time.monotonic() > deadline:
            return False
        tries += 1
        r, res = run_once(kind, workdir + "-shrink", seed, cand, size, daemon_cmd, False)
        if res is None:
            return False
        i, f = res
        ok = (f.kind, cand[min(i, len(cand) - 1)]["kind"] if i < len(cand) else "end") == sig
        if ok:
            best_run = (r, res)
        return ok

    # Cut everything after the failing step first: it cannot matter.
    n = 2
    while len(best) >= 2 and time.monotonic() < deadline:
        chunk = max(1, len(best) // n)
        removed = False
        for start in range(0, len(best), chunk):
            cand = best[:start] + best[start + chunk:]
            if cand and fails(cand):
                best = cand
                removed = True
                break
        if not removed:
            if chunk == 1:
                break
            n *= 2
        else:
            n = max(2, n - 1)
    # Shorten bursts.
    for i in range(len(best)):
        for key in ("ops", "burst", "burst2", "reads"):
            while time.monotonic() < deadline and best[i].get(key):
                ops = best[i][key]
                done = False
                for j in range(len(ops)):
                    cand = copy.deepcopy(best)
                    del cand[i][key][j]
                    if (cand[i][key] or key != "reads") and fails(cand):
                        best = cand
                        done = True
                        break
                if not done:
                    break
    return best, best_run, tries


def report_failure(kind, seed, steps, run, res, label):
    i, f = res
    print(f"\n=== {label}: seed {seed} failed at step {i} "
          f"({steps[i]['kind'] if i < len(steps) else 'end of run'}) — {f.kind}", flush=True)
    print(f"    {f.message}", flush=True)
    print("--- step list (JSON, for --replay):")
    print(json.dumps(steps))
    print("--- QMP commands sent:")
    for c in run.qmp_log:
        print("    " + json.dumps(c))


def signature(steps, res):
    i, f = res
    return (f.kind, steps[i]["kind"] if i < len(steps) else "end")


def allocation_summary(path):
    p = tool(["qemu-img", "map", "-U", "-f", "qcow2", "--output=json", path])
    out = []
    for e in json.loads(p.stdout):
        if e.get("depth") == 0 and e.get("present", True):
            out.append((e["start"], e["length"], "data" if e.get("data") else "zero"))
    return out


def discarded_ranges(steps):
    """Every range a step's writer discarded: after an NBD TRIM the content is unspecified
    (old data or zeros), and the two daemons may choose differently (QEMU, for one, drops
    discards that pass through a mirror's filter node)."""
    out = []
    for st in steps:
        for key in ("burst", "burst2", "ops"):
            for op in st.get(key, []) or []:
                if op[0] == "discard":
                    out.append((op[1], op[1] + op[2]))
    return out


def content_differences(a, b, size, ignore):
    """Byte ranges where two images' chains read differently, outside the `ignore` ranges."""
    with tempfile.TemporaryDirectory() as t:
        ra, rb = os.path.join(t, "a.raw"), os.path.join(t, "b.raw")
        tool(["qemu-img", "convert", "-U", "-O", "raw", a, ra])
        tool(["qemu-img", "convert", "-U", "-O", "raw", b, rb])
        with open(ra, "rb") as fa, open(rb, "rb") as fb:
            da, db = fa.read(), fb.read()
    mask = bytearray(len(da))
    for lo, hi in ignore:
        mask[lo:hi] = b"\x01" * (min(hi, len(mask)) - lo)
    diffs, i = [], 0
    while i < len(da):
        if da[i] != db[i] and not mask[i]:
            j = i
            while j < len(da) and da[j] != db[j] and not mask[j]:
                j += 1
            diffs.append((i, j - i))
            i = j
        else:
            i += 1
    return diffs, da != db


def differential(ours, theirs, size, discarded=()):
    """Compares what two runs of one step list left behind. Returns (problems, notes)."""
    problems, notes = [], []
    for name, a in ours.model.images.items():
        b = theirs.model.images.get(name)
        if b is None or a.state not in ("live", "frozen") or not os.path.exists(a.path) or not os.path.exists(b.path):
            continue
        ca = [os.path.basename(e["filename"]) for e in json.loads(tool(["qemu-img", "info", "-U", "--backing-chain", "--output=json", a.path]).stdout)]
        cb = [os.path.basename(e["filename"]) for e in json.loads(tool(["qemu-img", "info", "-U", "--backing-chain", "--output=json", b.path]).stdout)]
        if ca != cb:
            problems.append(f"{name}: backing chain ours {ca} vs qsd {cb}")
            continue
        p = tool(["qemu-img", "compare", "-U", a.path, b.path], check=False)
        if p.returncode != 0:
            diffs, _ = content_differences(a.path, b.path, size, discarded)
            if diffs:
                problems.append(f"{name}: guest-visible content differs outside discarded ranges at "
                                f"{[f'{o}+{n}' for o, n in diffs[:6]]}")
            else:
                notes.append(f"{name}: content differs only where a discard left old data or zeros (both allowed)")
        ma, mb = allocation_summary(a.path), allocation_summary(b.path)
        if ma != mb:
            def bitmap(entries, kind):
                bits = set()
                for s, n, k in entries:
                    if kind is None or k == kind:
                        bits.update(range(s // 4096, (s + n) // 4096))
                return bits
            da, db = bitmap(ma, None), bitmap(mb, None)
            only_a, only_b = len(da - db) * 4, len(db - da) * 4
            za, zb = bitmap(ma, "zero"), bitmap(mb, "zero")
            zdiff = len((za ^ zb) & da & db) * 4
            why = []
            if zdiff:
                why.append(f"{zdiff} KiB stored as zero clusters by one and as data by the other (zero detection: legitimate)")
            if only_a or only_b:
                why.append(f"{only_a} KiB allocated only by ours, {only_b} KiB only by qsd (cluster rounding / copy extent; "
                           "invisible to the guest since the chains read equal)")
            notes.append(f"{name}: depth-0 allocation differs: " + "; ".join(why))
    return problems, notes


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("daemon_kind", choices=["qblock", "qsd", "diff"])
    ap.add_argument("workdir")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--daemon-cmd", default=None, help="our nbd binary (qblock) or qemu-storage-daemon (qsd)")
    ap.add_argument("--qsd-cmd", default=None, help="qemu-storage-daemon binary for diff runs")
    ap.add_argument("--exclude", default="", help="comma-separated step tags to leave out")
    ap.add_argument("--replay", default=None, help="a JSON file holding a step list (instead of generating one)")
    ap.add_argument("--size", type=int, default=16, help="virtual size in MiB")
    ap.add_argument("--shrink-seconds", type=float, default=120)
    ap.add_argument("--no-shrink", action="store_true")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--allow-leaked-nodes", action="store_true",
                    help="nodes the daemon keeps open after they left every chain are checked only after quit")
    a = ap.parse_args()
    global ALLOW_LEAKS
    ALLOW_LEAKS = a.allow_leaked_nodes
    seed = a.seed if a.seed is not None else random.randrange(1 << 31)
    size = a.size * MiB
    exclude = {t for t in a.exclude.split(",") if t}
    if a.replay:
        with open(a.replay) as f:
            steps = json.load(f)
    else:
        steps = generate(seed, a.steps, size, exclude)
    if a.daemon_kind == "diff":
        # QEMU has no persistent mirror bitmap: the crash step is ours alone, and the two runs
        # must do the same writes to be compared.
        steps = [st for st in steps if st["kind"] != "crash-mirror"]
    print(f"live_model: kind={a.daemon_kind} seed={seed} steps={len(steps)} exclude={sorted(exclude)}", flush=True)
    os.makedirs(a.workdir, exist_ok=True)
    t0 = time.monotonic()
    status = 0
    kinds = ["qblock", "qsd"] if a.daemon_kind == "diff" else [a.daemon_kind]
    runs = {}
    for kind in kinds:
        cmd = a.daemon_cmd if (a.daemon_kind != "diff" or kind == "qblock") else a.qsd_cmd
        wd = os.path.join(a.workdir, kind)
        r, res = run_once(kind, wd, seed, steps, size, cmd, not a.quiet)
        runs[kind] = (r, res)
        if res is None:
            print(f"[{kind} seed={seed}] PASS: {len(steps)} steps agree with the model "
                  f"({len(r.model.images)} images){' — notes: ' + '; '.join(r.notes) if r.notes else ''}", flush=True)
            continue
        if kind == "qsd" and a.daemon_kind == "diff":
            i, f = res
            print(f"[qsd seed={seed}] QEMU DEVIATION from the model at step {i} "
                  f"({describe(steps[i]) if i < len(steps) else 'end'}): {f.kind}: {f.message}", flush=True)
            continue
        status = 1
        report_failure(kind, seed, steps, r, res, "FAILURE")
        if not a.no_shrink:
            sig = signature(steps, res)
            small, best, tries = shrink(kind, wd, seed, steps, size, cmd, sig, a.shrink_seconds)
            if best is not None:
                report_failure(kind, seed, small, best[0], best[1], f"SHRUNK REPRODUCER ({tries} runs)")
                print(f"--- rerun: live_model.py {kind} DIR --seed {seed} --replay FILE  (FILE holding the step list above)")
            else:
                print(f"--- shrinking found nothing smaller in {tries} runs")
    if a.daemon_kind == "diff" and all(res is None for _, res in runs.values()):
        problems, notes = differential(runs["qblock"][0], runs["qsd"][0], size, discarded_ranges(steps))
        for n in notes:
            print(f"[diff seed={seed}] note: {n}")
        for p in problems:
            print(f"[diff seed={seed}] DIFFERENCE: {p}")
        print(f"[diff seed={seed}] chains compared: {len(problems)} difference(s), {len(notes)} allocation note(s)")
        if problems:
            status = 1
    print(f"live_model: seed={seed} {'PASS' if status == 0 else 'FAIL'} in {time.monotonic() - t0:.1f}s", flush=True)
    sys.exit(status)


if __name__ == "__main__":
    main()
