"""Host-side checks of lvwriter's blocks (guests/riscv-writer/writer.c).

Block N lives at byte N*4096: magic "QLVWBLK1" | N u64 | sum u64 | 508 u64 words,
word i = (N * 0x9E3779B97F4A7C15) ^ ((i + 1) * 0xBF58476D1CE4E5B9), sum = N + words (mod 2^64).
"""
import os
import struct
import subprocess
import tempfile

BS = 4096
WORDS = (BS - 24) // 8
M64 = (1 << 64) - 1
_IC = [((i + 1) * 0xBF58476D1CE4E5B9) & M64 for i in range(WORDS)]
ZERO_CHUNK = bytes(1 << 20)


def expected(n):
    base = (n * 0x9E3779B97F4A7C15) & M64
    words = [base ^ c for c in _IC]
    s = (n + sum(words)) & M64
    return b"QLVWBLK1" + struct.pack("<QQ", n, s) + struct.pack("<%dQ" % WORDS, *words)


def to_raw(image, fmt, out):
    """qemu-img convert -U (the image may be in use) to a raw file."""
    subprocess.run(["qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", image, out], check=True,
                   capture_output=True)


def scan(raw_path):
    """Returns (prefix, problems): the number of leading valid blocks (0, 1, 2, ...) and a
    list of problems after it (a block that is neither valid-in-sequence nor all zero)."""
    problems = []
    prefix = 0
    with open(raw_path, "rb") as f:
        n = 0
        while True:
            b = f.read(BS)
            if len(b) < BS:
                break
            if b == expected(n):
                if prefix != n:
                    problems.append("block %d valid after a hole at %d" % (n, prefix))
                prefix = n + 1
            elif b.count(0) != BS:
                problems.append("block %d holds something else (%r...)" % (n, b[:24]))
            n += 1
            if n > prefix + 16:
                # Past the written prefix: the rest must be zeros; check in big chunks.
                rest = f.read(1 << 20)
                while rest:
                    if rest.count(0) != len(rest):
                        problems.append("non-zero data after block %d" % prefix)
                        break
                    rest = f.read(1 << 20)
                break
    return prefix, problems


def check_image(image, fmt, acked=None, at_least=None):
    """Checks `image`: its blocks are exactly 0..K-1 with K == acked (or K >= at_least).
    Returns (K, problems)."""
    with tempfile.TemporaryDirectory() as d:
        raw = os.path.join(d, "img.raw")
        to_raw(image, fmt, raw)
        k, problems = scan(raw)
    if acked is not None and k != acked:
        problems.append("holds %d blocks, the guest acknowledged %d" % (k, acked))
    if at_least is not None and k < at_least:
        problems.append("holds %d blocks, expected at least %d" % (k, at_least))
    return k, problems
