// Zero detection for buffers (convert's sparse detection, NBD's detect-zeroes).
// Written in C so that the compiler's vector extensions give a tight SIMD loop that Swift's
// generic SIMD types do not reliably produce.
#include "csupport.h"
#include <stdint.h>
#include <string.h>

typedef uint64_t qb_v2 __attribute__((vector_size(16), aligned(1)));

static int tail_is_zero(const unsigned char *p, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (p[i]) return 0;
    return 1;
}

int qb_buffer_is_zero(const void *buf, size_t len) {
    const unsigned char *p = buf;
    // Data usually shows in its first bytes.
    if (len >= 16) {
        uint64_t a, b;
        memcpy(&a, p, 8);
        memcpy(&b, p + 8, 8);
        if (a | b) return 0;
    }
    size_t i = 0;
    // 128 bytes a step in four 16-byte lanes, tested once per step.
    for (; i + 128 <= len; i += 128) {
        const qb_v2 *v = (const qb_v2 *)(p + i);
        qb_v2 x = v[0] | v[1], y = v[2] | v[3], z = v[4] | v[5], w = v[6] | v[7];
        x |= y;
        z |= w;
        x |= z;
        if (x[0] | x[1]) return 0;
    }
    return tail_is_zero(p + i, len - i);
}
