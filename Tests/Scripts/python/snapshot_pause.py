#!/usr/bin/env python3
"""Longest pause a writer sees during live snapshots.

Usage: snapshot_pause.py QMP_SOCKET DIR [ROUNDS]

Through the QMP monitor at QMP_SOCKET (ours or qemu-storage-daemon's, same commands): adds
DIR/base.qcow2 as node "d0", exports it writable over NBD, starts a writer (a minimal NBD
client: 4 KiB writes one after another, each timed), then takes ROUNDS external snapshots
(blockdev-snapshot-sync, each over the previous top). For each snapshot it records the
longest write that overlapped the command. Prints "pause-ms MEDIAN MAX baseline-ms P99".
"""
import asyncio
import os
import socket
import struct
import sys
import threading
import time

from qemu.qmp import QMPClient


class NBDWriter(threading.Thread):
    def __init__(self, path, name, size):
        super().__init__(daemon=True)
        self.s = socket.socket(socket.AF_UNIX)
        self.s.connect(path)
        self.size = size
        self.samples = []  # (start, end)
        self.stop = False
        self.handshake(name.encode())

    def recv(self, n):
        b = b""
        while len(b) < n:
            c = self.s.recv(n - len(b))
            if not c:
                raise EOFError
            b += c
        return b

    def handshake(self, name):
        assert self.recv(16) == b"NBDMAGICIHAVEOPT"
        self.recv(2)
        self.s.sendall(struct.pack(">I", 3))  # fixed newstyle, no zeroes
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        self.s.sendall(b"IHAVEOPT" + struct.pack(">II", 7, len(data)) + data)  # NBD_OPT_GO
        while True:
            magic, opt, typ, ln = struct.unpack(">QIII", self.recv(20))
            self.recv(ln)
            if typ == 1:
                return
            if typ & 0x80000000:
                raise RuntimeError("NBD_OPT_GO refused: %x" % typ)

    def run(self):
        buf = os.urandom(4096)
        off, handle = 0, 0
        while not self.stop:
            t0 = time.perf_counter()
            self.s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 1, handle, off, 4096) + buf)
            magic, err, h = struct.unpack(">IIQ", self.recv(16))
            t1 = time.perf_counter()
            if err:
                raise RuntimeError("write error %d" % err)
            self.samples.append((t0, t1))
            handle += 1
            off = (off + 4096) % self.size


async def main(qmp_path, d, rounds):
    c = QMPClient("pause-bench")
    await c.connect(qmp_path)
    await c.execute("blockdev-add", {"driver": "qcow2", "node-name": "d0",
                                     "file": {"driver": "file", "filename": f"{d}/base.qcow2"}})
    nbd = f"{d}/bench-nbd.sock"
    await c.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": nbd}}})
    await c.execute("block-export-add", {"type": "nbd", "id": "e0", "node-name": "d0", "writable": True, "name": "d0"})
    w = NBDWriter(nbd, "d0", 64 << 20)
    w.start()
    await asyncio.sleep(1.0)
    pauses = []
    top = "d0"
    for i in range(rounds):
        t0 = time.perf_counter()
        await c.execute("blockdev-snapshot-sync", {"node-name": top, "snapshot-file": f"{d}/snap{i}.qcow2",
                                                   "snapshot-node-name": f"s{i}", "format": "qcow2"})
        t1 = time.perf_counter()
        top = f"s{i}"
        await asyncio.sleep(0.5)
        over = [e - s for (s, e) in list(w.samples) if e >= t0 and s <= t1]
        pauses.append(max(over) if over else 0.0)
    w.stop = True
    w.join()
    w.s.close()
    await asyncio.sleep(0.1)
    lat = sorted(e - s for (s, e) in w.samples)
    p99 = lat[int(len(lat) * 0.99)] if lat else 0.0
    await c.execute("block-export-del", {"id": "e0"})
    await c.execute("nbd-server-stop")
    try:
        await c.execute("quit")
    except Exception:
        pass
    try:
        await c.disconnect()
    except Exception:
        pass
    pauses.sort()
    print("pause-ms %.3f %.3f baseline-ms %.3f writes %d" % (pauses[len(pauses) // 2] * 1000, pauses[-1] * 1000, p99 * 1000, len(lat)))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 5))
