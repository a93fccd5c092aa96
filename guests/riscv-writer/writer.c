// lvwriter: the live-operations test workload, a static riscv64 Linux program without libc
// (raw system calls). It appends numbered, checksummed 4 KiB blocks to a disk with O_DIRECT
// (block N at byte N*4096), counts a block acknowledged when its write returned, reads back
// and verifies an earlier block every few writes, and verifies every acknowledged block at
// the end. Console commands (one character, then Enter): 'q' stops, 'm' prints the blocks
// written, the time and the longest write latency since the previous 'm'.
//
// Usage: lvwriter DEVICE [MAX_BLOCKS [SYNC_EVERY]]   (0 = the whole disk / never)
// Output lines start with "writer: "; the last two are "writer: final acked=N failures=F"
// and "writer: PASS" or "writer: FAIL". Exit status 0 on PASS.
//
// Block layout (little-endian): magic "QLVWBLK1" | N u64 | sum u64 | 508 u64 words, word i =
// (N * 0x9E3779B97F4A7C15) ^ ((i + 1) * 0xBF58476D1CE4E5B9); sum = N + the words (mod 2^64).
// tests/python/livevm/blocks.py checks images on the host with the same rule.

typedef unsigned long u64;
typedef long i64;
typedef unsigned int u32;

#define BS 4096
#define WORDS ((BS - 24) / 8)
#define SYS_openat 56
#define SYS_read 63
#define SYS_write 64
#define SYS_pread64 67
#define SYS_pwrite64 68
#define SYS_fdatasync 83
#define SYS_exit 93
#define SYS_clock_gettime 113
#define SYS_ioctl 29
#define SYS_fcntl 25
#define SYS_nanosleep 101
#define AT_FDCWD (-100)
#define O_RDWR 2
#define O_NONBLOCK 04000
#define O_DIRECT 040000
#define F_GETFL 3
#define F_SETFL 4
#define BLKGETSIZE64 0x80081272UL

static i64 sys6(i64 n, i64 a, i64 b, i64 c, i64 d) {
    register i64 a7 __asm__("a7") = n;
    register i64 a0 __asm__("a0") = a;
    register i64 a1 __asm__("a1") = b;
    register i64 a2 __asm__("a2") = c;
    register i64 a3 __asm__("a3") = d;
    __asm__ volatile("ecall" : "+r"(a0) : "r"(a7), "r"(a1), "r"(a2), "r"(a3) : "memory");
    return a0;
}

static unsigned char buf[BS] __attribute__((aligned(4096)));
static unsigned char rbuf[BS] __attribute__((aligned(4096)));

static u64 slen(const char *s) { u64 n = 0; while (s[n]) n++; return n; }
static void out(const char *s) { sys6(SYS_write, 1, (i64)s, slen(s), 0); }

static char line[256];
static int lp;
static void put(const char *s) { while (*s && lp < 250) line[lp++] = *s++; }
static void putu(u64 v) {
    char t[24]; int i = 0;
    do { t[i++] = '0' + v % 10; v /= 10; } while (v);
    while (i && lp < 250) line[lp++] = t[--i];
}
static void flushline(void) { line[lp++] = '\n'; sys6(SYS_write, 1, (i64)line, lp, 0); lp = 0; }

static u64 now_us(void) {
    struct { i64 s, ns; } ts;
    sys6(SYS_clock_gettime, 1 /* CLOCK_MONOTONIC */, (i64)&ts, 0, 0);
    return (u64)ts.s * 1000000 + (u64)ts.ns / 1000;
}

static void fill(unsigned char *b, u64 n) {
    u64 *w = (u64 *)b;
    const char *m = "QLVWBLK1";
    for (int i = 0; i < 8; i++) b[i] = m[i];
    w[1] = n;
    u64 base = n * 0x9E3779B97F4A7C15UL, sum = n;
    for (u64 i = 0; i < WORDS; i++) { u64 v = base ^ ((i + 1) * 0xBF58476D1CE4E5B9UL); w[3 + i] = v; sum += v; }
    w[2] = sum;
}

static int check(const unsigned char *b, u64 n) {
    const u64 *w = (const u64 *)b;
    const char *m = "QLVWBLK1";
    for (int i = 0; i < 8; i++) if (b[i] != (unsigned char)m[i]) return 0;
    if (w[1] != n) return 0;
    u64 base = n * 0x9E3779B97F4A7C15UL, sum = n;
    for (u64 i = 0; i < WORDS; i++) { u64 v = base ^ ((i + 1) * 0xBF58476D1CE4E5B9UL); if (w[3 + i] != v) return 0; sum += v; }
    return w[2] == sum;
}

static u64 parse(const char *s) { u64 v = 0; while (*s >= '0' && *s <= '9') v = v * 10 + (u64)(*s++ - '0'); return v; }

static int fd;
static u64 failures;

static void verify(u64 n, const char *when) {
    i64 r = sys6(SYS_pread64, fd, (i64)rbuf, BS, (i64)(n * BS));
    if (r != BS || !check(rbuf, n)) {
        failures++;
        put("writer: VERIFY FAIL block "); putu(n); put(" ("); put(when); put(", read "); putu((u64)r); put(")"); flushline();
    }
}

int main(int argc, char **argv) {
    if (argc < 2) { out("writer: usage: lvwriter DEVICE [MAX_BLOCKS [SYNC_EVERY]]\n"); return 2; }
    u64 maxBlocks = argc > 2 ? parse(argv[2]) : 0, syncEvery = argc > 3 ? parse(argv[3]) : 32;
    fd = (int)sys6(SYS_openat, AT_FDCWD, (i64)argv[1], O_RDWR | O_DIRECT, 0);
    if (fd < 0) { put("writer: cannot open "); put(argv[1]); flushline(); return 2; }
    u64 size = 0;
    sys6(SYS_ioctl, fd, BLKGETSIZE64, (i64)&size, 0);
    u64 blocks = size / BS;
    if (maxBlocks && maxBlocks < blocks) blocks = maxBlocks;
    i64 fl = sys6(SYS_fcntl, 0, F_GETFL, 0, 0);
    if (fl >= 0) sys6(SYS_fcntl, 0, F_SETFL, fl | O_NONBLOCK, 0);
    put("writer: start blocks="); putu(blocks); put(" sync_every="); putu(syncEvery); flushline();

    u64 n = 0, rng = 0x2545F4914F6CDD1DUL;
    u64 t0 = now_us(), lastReport = t0, markTime = t0, markBlocks = 0, markMax = 0, markSyncMax = 0, maxLat = 0;
    int quit = 0;
    while (!quit) {
        char cmd[64];
        i64 got = sys6(SYS_read, 0, (i64)cmd, sizeof cmd, 0);
        for (i64 i = 0; i < got; i++) {
            if (cmd[i] == 'q') quit = 1;
            if (cmd[i] == 'm') {
                u64 t = now_us();
                put("writer: mark blocks="); putu(n - markBlocks); put(" us="); putu(t - markTime);
                put(" maxlat_us="); putu(markMax); put(" maxsync_us="); putu(markSyncMax); put(" acked="); putu(n); flushline();
                markTime = t; markBlocks = n; markMax = 0; markSyncMax = 0;
            }
        }
        if (quit) break;
        if (n < blocks) {
            fill(buf, n);
            u64 a = now_us();
            i64 r = sys6(SYS_pwrite64, fd, (i64)buf, BS, (i64)(n * BS));
            u64 lat = now_us() - a;
            if (r != BS) {
                failures++;
                put("writer: WRITE FAIL block "); putu(n); put(" ret "); putu((u64)r); flushline();
                break;
            }
            n++;
            if (lat > markMax) markMax = lat;
            if (lat > maxLat) maxLat = lat;
            if (syncEvery && n % syncEvery == 0) {
                a = now_us();
                if (sys6(SYS_fdatasync, fd, 0, 0, 0) != 0) { failures++; put("writer: FLUSH FAIL"); flushline(); }
                lat = now_us() - a;
                if (lat > markSyncMax) markSyncMax = lat;
            }
            if (n % 4 == 0) {
                rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
                verify(rng % n, "running");
            }
        } else {
            // The disk is full: keep verifying until told to stop.
            rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
            verify(rng % (n ? n : 1), "full");
            struct { i64 s, ns; } ts = { 0, 20000000 };
            sys6(SYS_nanosleep, (i64)&ts, 0, 0, 0);
        }
        u64 t = now_us();
        if (t - lastReport >= 1000000) {
            lastReport = t;
            put("writer: acked="); putu(n); put(" maxlat_us="); putu(maxLat); flushline();
        }
    }
    if (sys6(SYS_fdatasync, fd, 0, 0, 0) != 0) { failures++; out("writer: FLUSH FAIL\n"); }
    for (u64 i = 0; i < n; i++) verify(i, "final");
    u64 secs = (now_us() - t0) / 1000;
    put("writer: verified "); putu(n); put(" blocks in "); putu(secs); put(" ms, max write latency "); putu(maxLat); put(" us"); flushline();
    put("writer: final acked="); putu(n); put(" failures="); putu(failures); flushline();
    out(failures ? "writer: FAIL\n" : "writer: PASS\n");
    return failures ? 1 : 0;
}

// The entry point: argc at sp, argv after it (the ELF start-up stack).
__asm__(".globl _start\n_start:\n mv a0, sp\n andi sp, sp, -16\n call start_c\n");

void start_c(long *sp) {
    int argc = (int)sp[0];
    char **argv = (char **)(sp + 1);
    int rc = main(argc, argv);
    sys6(SYS_exit, rc, 0, 0, 0);
    for (;;) {}
}
