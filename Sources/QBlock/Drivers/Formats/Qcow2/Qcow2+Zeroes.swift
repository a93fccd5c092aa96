#if canImport(Glibc)
import Glibc
#endif
import QBlockCore
import QBlockGraph

/// Zero writes and discards: whole clusters change their L2 entries, partial clusters are
/// written (split from Qcow2+ReadWrite.swift by concern).
extension Qcow2Node {
    // MARK: Zeroes and discard

    /// Write-zeroes as QEMU's qcow2 driver does it: whole clusters get the zero flag (v3) or
    /// are discarded (v2 without a backing file); a partial cluster is zeroed as a whole when
    /// the rest of it already reads as zeros and nothing is allocated there, else it gets
    /// explicit zero data.
    public func writeZeroes(at offset: Int64, length: Int64, flags: WriteFlags) async throws {
        try gate.enter(filename, "write zeroes")
        defer { gate.leave() }
        try checkWritable("write zeroes")
        try checkRange(offset, length, "write zeroes")
        defer { markBitmaps(offset, length) }
        try await writeZeroesAdmitted(at: offset, length: length, flags: writeThrough.value ? flags.union(.fua) : flags)
    }

    /// ``writeZeroes(at:length:flags:)`` for a range already checked, in a request the gate
    /// already admitted (a resize that zeroes the area it adds); it marks no bitmaps.
    func writeZeroesAdmitted(at offset: Int64, length: Int64, flags: WriteFlags) async throws {
        let cs = Int64(clusterSize)
        let end = offset + length
        let size = Int64(header.size)
        let efficient = header.version >= 3 || (backingNode == nil && header.backingFileName == nil)
        guard efficient else {
            try await zeroExplicitly(from: offset, to: end, flags: flags)
            if flags.contains(.fua) { try await flushAdmitted(lazyRefcounts: true) }
            return
        }
        // [offset, headEnd) and [tailStart, end) are partial clusters, whole clusters between
        // them; the last cluster of an image whose size is unaligned counts as whole.
        let headEnd = offset % cs == 0 ? offset : min(end, (offset + cs - 1) / cs * cs)
        var tailStart = max(headEnd, end / cs * cs)
        if end >= size { tailStart = end }
        if headEnd > offset { try await zeroPartialCluster(from: offset, to: headEnd, flags: flags) }
        if tailStart > headEnd {
            try await zeroWholeClusters(from: headEnd, to: tailStart, unmap: flags.contains(.mayUnmap))
        }
        if end > tailStart { try await zeroPartialCluster(from: tailStart, to: end, flags: flags) }
        if flags.contains(.fua) { try await flushAdmitted(lazyRefcounts: true) }
    }

    /// Zeroes [start, end), which lies inside one cluster. The check that the rest of the
    /// cluster reads as zeros and the L2 update happen under one hold of the lock, so a
    /// concurrent write to the same cluster cannot slip in between.
    func zeroPartialCluster(from start: Int64, to end: Int64, flags: WriteFlags) async throws {
        let cs = Int64(clusterSize)
        let clusterStart = start / cs * cs
        let clusterEnd = min(clusterStart + cs, Int64(header.size))
        let cluster = clusterStart / cs
        while true {
            await metaLock.lock()
            guard await waitForInflight(cluster, 1) else { continue }
            do {
                let m = try await lookup(clusterStart, clusterEnd - clusterStart)
                if m.kind == .unallocated || m.kind == .zero {
                    let headZero = try await readsAsZeroLocked(clusterStart, start)
                    let tailZero = try await readsAsZeroLocked(end, clusterEnd)
                    if headZero && tailZero {
                        try await transformClustersLocked(cluster, 1, zeroTransform(unmap: flags.contains(.mayUnmap)))
                        metaLock.unlock()
                        return
                    }
                }
            } catch {
                metaLock.unlock()
                throw error
            }
            metaLock.unlock()
            try await zeroExplicitly(from: start, to: end, flags: flags)
            return
        }
    }

    /// Whether guest bytes [start, end) read as zeros, judged by block status. Lock held.
    func readsAsZeroLocked(_ start: Int64, _ end: Int64) async throws -> Bool {
        var pos = start
        while pos < end {
            let m = try await lookup(pos, end - pos)
            switch m.kind {
            case .zero, .zeroAllocated: break
            case .normal, .compressed: return false
            case .unallocated:
                if let b = backingNode, pos < b.length {
                    var p = pos
                    let stop = min(pos + m.length, b.length)
                    while p < stop {
                        let st = try await b.blockStatus(at: p, length: stop - p)
                        if !st.flags.contains(.zero) { return false }
                        p += st.length
                    }
                }
            }
            pos += m.length
        }
        return true
    }

    /// Explicit zero data through the normal write path.
    func zeroExplicitly(from start: Int64, to end: Int64, flags: WriteFlags) async throws {
        guard end > start else { return }
        if flags.contains(.noFallback) {
            throw BlockError(.unsupported, "write zeroes cannot be done efficiently here", errno: ENOTSUP, path: filename, offset: start)
        }
        let zeros = AlignedBuffer(count: Int(min(end - start, 1 << 20)))
        var p = start
        while p < end {
            let k = Int(min(Int64(zeros.count), end - p))
            // SAFETY: `k <= zeros.count`, and the async closure keeps `zeros` alive until the write
            // returns.
            try await zeros.withUnsafeBytes { z in
                try await self.writeAdmitted(at: p, from: UnsafeRawBufferPointer(rebasing: z[0..<k]), flags: [], placed: nil)
            }
            p += Int64(k)
        }
    }

    /// Makes whole clusters in [start, end) read as zeros: the v3 zero flag (unmapping when
    /// allowed, and always for compressed clusters), or a discard in v2.
    func zeroWholeClusters(from start: Int64, to end: Int64, unmap: Bool) async throws {
        try await updateWholeClusters(from: start, to: end, zeroTransform(unmap: unmap))
    }

    /// The L2 entry change that makes a cluster read as zeros: the zero flag in v3 (dropping
    /// the host cluster when unmapping is allowed, and always for compressed data); in v2,
    /// only possible without a backing file, a discard.
    func zeroTransform(unmap: Bool) -> (UInt64) -> (UInt64, Bool) {
        if header.version < 3 { return discardTransform() }
        return { e in
            let k = self.kind(of: e)
            let allocated = k == .normal || k == .zeroAllocated || k == .compressed
            let drop = k == .compressed || (unmap && allocated)
            return ((drop ? 0 : e) | Qcow2Node.zeroFlag, drop)
        }
    }

    /// Discards `length` bytes at guest `offset`: whole clusters become unallocated (or zero
    /// clusters where a backing node would show through), and their space is freed as QEMU's
    /// `qcow2_co_pdiscard` does; partial clusters are left alone, and so is everything in a
    /// v2 image with a backing file.
    /// - Throws: ``BlockError`` `.closed` after ``close()``, `.readOnly`, `.outOfRange` for a range past the end, or an I/O error.
    public func discard(at offset: Int64, length: Int64) async throws {
        try gate.enter(filename, "discard")
        defer { gate.leave() }
        try checkWritable("discard")
        try checkRange(offset, length, "discard")
        defer { markBitmaps(offset, length) }
        // As QEMU's qcow2_co_pdiscard: a v2 image has no zero flag, and unallocating would
        // show the backing file's data, so the request changes nothing.
        if header.version < 3 && (backingNode != nil || header.backingFileName != nil) { return }
        let cs = Int64(clusterSize)
        let start = (offset + cs - 1) / cs * cs
        var end = (offset + length) / cs * cs
        if offset + length >= Int64(header.size) { end = offset + length }
        guard end > start else { return }
        try await discardClusters(from: start, to: end)
    }

    /// Discards whole clusters: they read as zeros in v3 (or show the backing file in v2).
    func discardClusters(from start: Int64, to end: Int64) async throws {
        try await updateWholeClusters(from: start, to: end, discardTransform())
    }

    func discardTransform() -> (UInt64) -> (UInt64, Bool) {
        let v3 = header.version >= 3
        let hasBacking = backingNode != nil || header.backingFileName != nil
        return { e in
            let k = self.kind(of: e)
            let allocated = k == .normal || k == .zeroAllocated || k == .compressed
            let newEntry: UInt64 = (v3 && (hasBacking || allocated)) ? Qcow2Node.zeroFlag : 0
            return (newEntry, allocated)
        }
    }

    /// Applies `transform` to the L2 entries of whole clusters in [start, end), freeing the
    /// old host cluster when it says so. Waits for allocations in flight.
    func updateWholeClusters(from start: Int64, to end: Int64,
                                     _ transform: @escaping (UInt64) -> (UInt64, Bool)) async throws {
        let cbits = Int64(clusterBits)
        var cluster = start >> cbits
        let endCluster = (end + Int64(clusterSize) - 1) >> cbits
        while cluster < endCluster {
            await metaLock.lock()
            let firstL2 = Int(cluster % Int64(l2Entries))
            let n = min(endCluster - cluster, Int64(l2Entries - firstL2))
            guard await waitForInflight(cluster, n) else { continue }
            do {
                try await transformClustersLocked(cluster, n, transform)
            } catch {
                metaLock.unlock()
                throw error
            }
            metaLock.unlock()
            cluster += n
        }
    }

    /// Applies `transform` to `n` L2 entries from guest cluster `cluster` (within one L2
    /// table). Freed clusters are discarded in the host file too. Lock held.
    func transformClustersLocked(_ cluster: Int64, _ n: Int64,
                                         _ transform: (UInt64) -> (UInt64, Bool)) async throws {
        let l1Index = Int(cluster / Int64(l2Entries))
        let firstL2 = Int(cluster % Int64(l2Entries))
        if l1Index >= l1Table.count { return }
        // Nothing to do for a missing L2 table whose clusters would stay unallocated.
        if try await l2Offset(l1Index) == 0 && transform(0).0 == 0 { return }
        let t = try await l2TableForWrite(l1Index)
        l2Cache.pin(t)
        defer { l2Cache.release(t) }
        for i in 0..<Int(n) {
            let old = t.bytes.be64((firstL2 + i) * 8)
            let (new, free) = transform(old)
            if new == old { continue }
            t.bytes.setBE64((firstL2 + i) * 8, new)
            l2Cache.markDirty(t)
            if free {
                // The L2 change reaches the disk before the refcount drop (cache dependency).
                switch kind(of: old) {
                case .compressed: try await freeCompressed(entry: old, discardHost: passDiscard(.request))
                case .normal, .zeroAllocated:
                    try await freeClusters(at: Int64(old & Qcow2Node.l2OffsetMask), count: 1, discardHost: passDiscard(.request))
                default: break
                }
            }
        }
    }
}
