#!/usr/bin/env python3
"""Drive a QMP monitor with the real qemu.qmp client, one command per stdin line.

Usage: qmp_drive.py SOCKET

Each input line is a JSON object:
  {"execute": NAME, "arguments": {...}}   -> prints {"return": ...} or {"error": {"class": ..., "desc": ...}}
  {"wait-event": NAME, "timeout": SECONDS} -> prints the event, or {"error": {"class": "Timeout", ...}}
Each answer is one line of JSON on stdout. Exits 3 if qemu.qmp is missing.
"""
import asyncio
import json
import sys

try:
    from qemu.qmp import QMPClient, ExecuteError
except ImportError:
    print(json.dumps({"error": {"class": "Missing", "desc": "qemu.qmp not installed"}}), flush=True)
    sys.exit(3)


async def main(path):
    client = QMPClient("qblock-test")
    await client.connect(path)
    print(json.dumps({"greeting": dict(client.greeting._raw)}), flush=True)
    events = []

    async def collect():
        async for ev in client.events:
            events.append(dict(ev))

    collector = asyncio.create_task(collect())
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        req = json.loads(line)
        if "wait-event" in req:
            name, deadline = req["wait-event"], loop.time() + req.get("timeout", 5)
            found = None
            while found is None and loop.time() < deadline:
                for i, ev in enumerate(events):
                    if ev.get("event") == name:
                        found = events.pop(i)
                        break
                else:
                    await asyncio.sleep(0.01)
            print(json.dumps(found if found else {"error": {"class": "Timeout", "desc": name}}), flush=True)
            continue
        try:
            ret = await client.execute(req["execute"], req.get("arguments"))
            print(json.dumps({"return": ret}), flush=True)
        except ExecuteError as e:
            print(json.dumps({"error": {"class": e.error_class, "desc": e.error.error.desc}}), flush=True)
    collector.cancel()
    try:
        await client.disconnect()
    except (EOFError, ConnectionError, OSError):
        pass  # the daemon went away after `quit`


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
