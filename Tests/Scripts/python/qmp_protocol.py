#!/usr/bin/env python3
"""Protocol checks against a QMP monitor at SOCKET (ours or qemu-storage-daemon's).

Prints one line per check ("ok NAME" or "FAIL NAME: detail") and exits 1 on any failure,
3 if qemu.qmp is missing.
"""
import asyncio
import json
import socket
import sys

try:
    from qemu.qmp import QMPClient, ExecuteError
except ImportError:
    print("qemu.qmp not installed")
    sys.exit(3)

failures = 0


def check(name, cond, detail=""):
    global failures
    print(("ok " if cond else "FAIL ") + name + ("" if cond else ": " + str(detail)), flush=True)
    if not cond:
        failures += 1


class Raw:
    """A raw line-oriented QMP connection (to send malformed input)."""
    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.settimeout(10)
        self.s.connect(path)
        self.f = self.s.makefile("rwb", buffering=0)

    def line(self):
        return json.loads(self.f.readline())

    def send(self, data):
        self.s.sendall(data)
        return self.line()


def raw_checks(path):
    r = Raw(path)
    g = r.line()
    check("greeting shape", set(g) == {"QMP"} and set(g["QMP"]) == {"version", "capabilities"}
          and set(g["QMP"]["version"]["qemu"]) == {"major", "minor", "micro"}, g)
    e = r.send(b'{"execute": "query-version"}\n')
    check("negotiation required", e.get("error", {}).get("desc") == "Expecting capabilities negotiation with 'qmp_capabilities'"
          and e["error"]["class"] == "CommandNotFound", e)
    check("qmp_capabilities", r.send(b'{"execute": "qmp_capabilities", "id": 1}\n') == {"return": {}, "id": 1})
    e = r.send(b'{"execute": "qmp_capabilities"}\n')
    check("negotiation once", e.get("error", {}).get("class") == "CommandNotFound", e)
    cases = [
        (b'{"execute": }\n', "JSON parse error, expecting value"),
        (b'{"execute": "query-version",}\n', "JSON parse error, expecting value"),
        (b'[1, 2]\n', "QMP input must be a JSON object"),
        (b'{"execute": 1}\n', "QMP input member 'execute' must be a string"),
        (b'{"execute": "query-version", "arguments": []}\n', "QMP input member 'arguments' must be an object"),
        (b'{"exec": "query-version"}\n', "QMP input member 'exec' is unexpected"),
        (b'{"execute": "query-version", "arguments": {"a": 1}}\n', "Parameter 'a' is unexpected"),
        (b'{"execute": "nope"}\n', "The command nope has not been found"),
        (b'{"execute": "blockdev-del", "arguments": {"node-name": 5}}\n',
         "Invalid parameter type for 'node-name', expected: string"),
        (b'{"execute": "block-dirty-bitmap-add", "arguments": {"node": "x", "name": "b", "granularity": -1}}\n',
         "Parameter 'granularity' expects uint32_t"),
        (b'{"execute": "blockdev-del"}\n', "Parameter 'node-name' is missing"),
    ]
    for data, desc in cases:
        e = r.send(data)
        check("error " + data.decode().strip(), e.get("error", {}).get("desc") == desc, e)
    # Huge input: answered with an error, the connection stays usable.
    big = b'{"execute": "query-version", "arguments": {"x": "' + b"a" * (20 << 20) + b'"}}\n'
    e = r.send(big)
    check("huge input refused", "error" in e, e)
    e = r.send(b'[' * 5000 + b']' * 5000 + b'\n')
    check("deep nesting refused", "error" in e, e)
    e = r.send(b'{"execute": "query-version", "arguments": {"x": ' + b'[' * 1000 + b']' * 1000 + b'}}\n')
    check("1000 levels parsed", e.get("error", {}).get("desc") == "Parameter 'x' is unexpected", str(e)[:80])
    many = b", ".join(b'"k%d": 1' % i for i in range(200000))
    e = r.send(b'{"execute": "query-version", "arguments": {' + many + b'}}\n')
    check("200000 members answered", e.get("error", {}).get("desc") == "Parameter 'k0' is unexpected", str(e)[:120])
    e = r.send(b'{"execute": "query-version", "id": [1, {"a": null}]}\n')
    check("still alive, id echoed", "return" in e and e.get("id") == [1, {"a": None}], e)
    # Pipelined commands are answered in order.
    r.s.sendall(b"".join(b'{"execute": "query-version", "id": %d}\n' % i for i in range(100)))
    ids = [r.line().get("id") for _ in range(100)]
    check("pipelined replies in order", ids == list(range(100)), ids[:10])
    # Binary garbage gets errors, never a crash; the connection still works afterwards.
    r.s.sendall(bytes(range(1, 32)) + b"\xff\xfe\n" + b'{"execute": "query-version", "id": "after"}\n')
    seen = None
    for _ in range(64):
        m = r.line()
        if m.get("id") == "after":
            seen = m
            break
        if "error" not in m:
            break
    check("garbage answered with errors", seen is not None and "return" in seen, seen)
    # A client that leaves with a command in flight does no harm.
    q = Raw(path)
    q.line()
    q.s.sendall(b'{"execute": "qmp_capabilities"}\n{"execute": "query-named-block-nodes"}\n')
    q.s.close()
    check("after a client left", "return" in r.send(b'{"execute": "query-commands"}\n'))
    return r


async def event_checks(path, image):
    clients = []
    for i in range(3):
        c = QMPClient(f"c{i}")
        await c.connect(path)
        clients.append(c)
    await clients[0].execute("blockdev-add", {"driver": "raw", "node-name": "evdisk",
                                              "file": {"driver": "file", "filename": image}})
    nbdsock = image + ".nbd.sock"
    await clients[0].execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": nbdsock}}})
    await clients[1].execute("block-export-add", {"type": "nbd", "id": "ev0", "node-name": "evdisk"})
    exports = await clients[2].execute("query-block-exports")
    check("query-block-exports", exports == [{"type": "nbd", "id": "ev0", "node-name": "evdisk", "shutting-down": False}], exports)
    await clients[1].execute("block-export-del", {"id": "ev0"})
    for i, c in enumerate(clients):
        try:
            ev = await asyncio.wait_for(c.events.get(), 5)
            ok = ev["event"] == "BLOCK_EXPORT_DELETED" and ev["data"] == {"id": "ev0"} \
                and set(ev["timestamp"]) == {"seconds", "microseconds"}
            check(f"event reaches client {i}", ok, dict(ev))
        except asyncio.TimeoutError:
            check(f"event reaches client {i}", False, "timeout")
    try:
        await clients[0].execute("blockdev-del", {"node-name": "nope"})
        check("ExecuteError", False, "no error")
    except ExecuteError as e:
        check("ExecuteError", e.error_class == "GenericError" and "nope" in e.error.error.desc, e)
    await clients[0].execute("nbd-server-stop")
    await clients[0].execute("blockdev-del", {"node-name": "evdisk"})
    for c in clients:
        await c.disconnect()


if __name__ == "__main__":
    sock, image = sys.argv[1], sys.argv[2]
    raw = raw_checks(sock)
    asyncio.run(event_checks(sock, image))
    print(f"{failures} failed", flush=True)
    sys.exit(1 if failures else 0)
