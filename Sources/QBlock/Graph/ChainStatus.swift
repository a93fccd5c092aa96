/// Allocation across part of a backing chain (QEMU's `bdrv_is_allocated_above`).
public enum ChainStatus {
    /// Whether the run at `offset` is allocated in some node from `top` down to, but not
    /// including, `base` (nil: the whole chain), and how long the run with that answer
    /// is (at most `length`). A region beyond the end of a node that is not the top reads
    /// as zeros from that node and counts as allocated, as in QEMU. Filters anywhere in the
    /// chain are looked through.
    public static func isAllocatedAbove(_ top: (any BlockDriver)?, base: (any BlockDriver)?,
                                        at offset: Int64, length: Int64) async throws -> (allocated: Bool, length: Int64) {
        var n = length
        // Filters hold no content of their own: the question is about the nodes below them.
        var node = top?.skippingFilters
        var first = true
        while let cur = node, !cur.isSameNode(as: base) {
            if !first && offset >= cur.length { return (true, n) }
            if offset >= cur.length { return (false, n) }
            n = min(n, cur.length - offset)
            let st = try await cur.blockStatus(at: offset, length: n)
            n = min(n, st.length)
            if st.flags.contains(.allocated) { return (true, n) }
            node = cur.backing?.skippingFilters
            first = false
        }
        return (false, n)
    }
}
