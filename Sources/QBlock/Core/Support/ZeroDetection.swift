import CSupport

/// Whether `count` bytes at `p` are all zero (a vectorized scan in C).
@inlinable @inline(__always)
package func isZero(_ p: UnsafeRawPointer, _ count: Int) -> Bool {
    qb_buffer_is_zero(p, count) != 0
}
