#!/usr/bin/env python3
"""Replays a QMP script on a raw socket and prints every reply line as received.

Usage: qmp_transcript.py SOCKET SCRIPT DIR
SCRIPT holds one command per line (JSON; "$DIR" is replaced by DIR). Events are skipped,
"#blockNNN" node names are printed as "#blockN" (QEMU's are partly random), so that two
monitors' transcripts can be compared byte for byte.

Two more kinds of line:
  {"wait-event": NAME, "timeout": S}
                             prints the first not yet printed event NAME (waiting up to S
                             seconds, 10 by default) without its timestamp, or "timeout NAME"
  a command with "mask": [KEY...] (not sent) prints those keys' values as "*" in its
                             reply (values known to differ for reasons outside the test)
  {"run": [ARGV...]}         runs a program (qemu-io through an export, say) and prints
                             "run: STATUS"
  {"wait-job": ID, "timeout": S}
                             consumes job ID's JOB_STATUS_CHANGE events until it concludes
                             (or is dismissed) and prints "job ID: STATUS STATUS ..."
"""
import json
import re
import select
import socket
import subprocess
import sys
import time

s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
buf = b""


def readline(timeout=20.0):
    """One line from the monitor, or None when nothing complete arrives in time."""
    global buf
    deadline = time.time() + timeout
    while b"\n" not in buf:
        left = deadline - time.time()
        if left <= 0 or not select.select([s], [], [], left)[0]:
            return None
        chunk = s.recv(65536)
        if not chunk:
            sys.exit("connection closed")
        buf += chunk
    line, _, buf = buf.partition(b"\n")
    return line.decode()


readline()
events = []
TIMESTAMP = re.compile(r'"timestamp": \{"seconds": [0-9]+, "microseconds": [0-9]+\}, ')


def show(text):
    print(re.sub(r"#block[0-9]+", "#blockN", text.rstrip("\r\n")), flush=True)


for line in open(sys.argv[2]):
    line = line.strip()
    if not line or line.startswith("//"):
        continue
    line = line.replace("$DIR", sys.argv[3])
    if line.startswith('{"wait-event"'):
        req = json.loads(line)
        name = req["wait-event"]
        deadline = time.time() + req.get("timeout", 10)
        found = None
        while found is None:
            for i, ev in enumerate(events):
                if '"event": "%s"' % name in ev:
                    found = events.pop(i)
                    break
            else:
                ev = readline(deadline - time.time())
                if ev is None:
                    break
                events.append(ev)
        show(TIMESTAMP.sub("", found) if found else "timeout " + name)
        continue
    if line.startswith('{"wait-job"'):
        req = json.loads(line)
        job = req["wait-job"]
        deadline = time.time() + req.get("timeout", 10)
        seen = []
        while not seen or seen[-1] not in ("concluded", "null"):
            for i, ev in enumerate(events):
                e = json.loads(ev)
                if e.get("event") == "JOB_STATUS_CHANGE" and e["data"]["id"] == job:
                    seen.append(e["data"]["status"])
                    events.pop(i)
                    break
            else:
                ev = readline(deadline - time.time())
                if ev is None:
                    seen.append("timeout")
                    break
                events.append(ev)
        print("job %s: %s" % (job, " ".join(seen)), flush=True)
        continue
    if line.startswith('{"run"'):
        r = subprocess.run(json.loads(line)["run"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        print("run: %d" % r.returncode, flush=True)
        continue
    mask = []
    if '"mask"' in line:
        req = json.loads(line)
        mask = req.pop("mask")
        line = json.dumps(req)
    s.sendall(line.encode() + b"\n")
    while True:
        reply = readline()
        if reply is None:
            sys.exit("no reply")
        if '"event"' not in reply:
            break
        events.append(reply)
    for key in mask:
        reply = re.sub(r'"%s": [0-9]+' % re.escape(key), '"%s": "*"' % key, reply)
    show(reply)
