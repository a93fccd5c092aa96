#!/usr/bin/env python3
"""Replays a QMP script on a raw socket and prints every reply line as received.

Usage: qmp_transcript.py SOCKET SCRIPT DIR
SCRIPT holds one command per line (JSON; "$DIR" is replaced by DIR). Events are skipped,
"#blockNNN" node names are printed as "#blockN" (QEMU's are partly random), so that two
monitors' transcripts can be compared byte for byte.
"""
import re
import socket
import sys

s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.settimeout(20)
f = s.makefile("rb")
f.readline()
for line in open(sys.argv[2]):
    line = line.strip()
    if not line or line.startswith("//"):
        continue
    s.sendall(line.replace("$DIR", sys.argv[3]).encode() + b"\n")
    while True:
        reply = f.readline().decode()
        if not reply:
            sys.exit("connection closed")
        if '"event"' not in reply:
            break
    print(re.sub(r"#block[0-9]+", "#blockN", reply.rstrip("\r\n")), flush=True)
