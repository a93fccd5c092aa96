#if canImport(Glibc)
import Glibc
#endif
import QBlockCore

/// Refcounts and cluster allocation (QEMU's `qcow2-refcount.c`).
///
/// Every host cluster has a reference count stored in a refcount block; the refcount
/// table lists the blocks. A cluster is free when its count is zero. Blocks and the
/// table are allocated like any cluster; a new refcount block describes itself when it
/// falls in the range it covers, and a grown table is placed at the end of the image
/// together with the blocks that cover it.
extension Qcow2Node {
    // MARK: Entry encoding

    @inline(__always)
    func refcountValue(in block: UnsafeMutableRawBufferPointer, _ i: Int) -> UInt64 {
        Qcow2Node.refcountValue(order: Int(header.refcountOrder), in: block, i)
    }

    @inline(__always)
    func setRefcountValue(in block: UnsafeMutableRawBufferPointer, _ i: Int, _ v: UInt64) {
        Qcow2Node.setRefcountValue(order: Int(header.refcountOrder), in: block, i, v)
    }

    /// Entry `i` of a refcount block whose entries are `1 << order` bits wide.
    @inline(__always)
    static func refcountValue(order: Int, in block: UnsafeMutableRawBufferPointer, _ i: Int) -> UInt64 {
        switch order {
        case 0: return UInt64((block[i / 8] >> UInt8(i % 8)) & 0x1)
        case 1: return UInt64((block[i / 4] >> UInt8(2 * (i % 4))) & 0x3)
        case 2: return UInt64((block[i / 2] >> UInt8(4 * (i % 2))) & 0xf)
        case 3: return UInt64(block[i])
        case 4: return UInt64(UInt16(bigEndian: block.loadUnaligned(fromByteOffset: i * 2, as: UInt16.self)))
        case 5: return UInt64(UInt32(bigEndian: block.loadUnaligned(fromByteOffset: i * 4, as: UInt32.self)))
        default: return block.be64(i * 8)
        }
    }

    @inline(__always)
    static func setRefcountValue(order: Int, in block: UnsafeMutableRawBufferPointer, _ i: Int, _ v: UInt64) {
        switch order {
        case 0:
            let s = UInt8(i % 8)
            block[i / 8] = (block[i / 8] & ~(0x1 << s)) | (UInt8(v & 0x1) << s)
        case 1:
            let s = UInt8(2 * (i % 4))
            block[i / 4] = (block[i / 4] & ~(0x3 << s)) | (UInt8(v & 0x3) << s)
        case 2:
            let s = UInt8(4 * (i % 2))
            block[i / 2] = (block[i / 2] & ~(0xf << s)) | (UInt8(v & 0xf) << s)
        case 3: block[i] = UInt8(v)
        case 4: block.setBE16(i * 2, UInt16(v))
        case 5: block.setBE32(i * 4, UInt32(v))
        default: block.setBE64(i * 8, v)
        }
    }

    var maxRefcount: UInt64 { header.refcountOrder == 6 ? UInt64.max : (UInt64(1) << UInt64(header.refcountBits)) - 1 }

    // MARK: Reading

    /// The refcount of host cluster `cluster` (0 for clusters no block covers).
    func refcount(of cluster: Int64) async throws -> UInt64 {
        let ti = Int(cluster / Int64(refcountBlockEntries))
        guard ti < refcountTable.count else { return 0 }
        let blockOffset = try await refcountBlockOffset(ti)
        if blockOffset == 0 { return 0 }
        let e = try await refcountCache.get(blockOffset)
        return refcountValue(in: e.bytes, Int(cluster % Int64(refcountBlockEntries)))
    }

    /// The offset of refcount block `ti` (0: none). An unaligned one marks the image
    /// corrupt, with QEMU's message (qcow2_get_refcount, alloc_refcount_block).
    func refcountBlockOffset(_ ti: Int) async throws -> Int64 {
        let off = Int64(refcountTable[ti] & Qcow2Node.l1OffsetMask)
        if off & Int64(clusterSize - 1) != 0 {
            throw await signalCorruption("Refblock offset 0x\(String(off, radix: 16)) unaligned (reftable index: 0x\(String(ti, radix: 16)))",
                                         offset: off)
        }
        return off
    }

    // MARK: Updating

    /// Adds `delta` to the refcount of `cluster`, allocating its refcount block if needed.
    /// - Throws: `.corrupt` on overflow or underflow.
    /// With `discardHost`, a cluster whose count drops to zero is also discarded in the host
    /// file (QEMU's discard passthrough for guest requests).
    func updateRefcount(_ cluster: Int64, by delta: Int64, discardHost: Bool = false) async throws {
        try await markDirtyBeforeMetadataChange()
        await hostFile.debugEvent(.refblockAlloc)
        try await ensureRefcountBlock(for: cluster)
        let ti = Int(cluster / Int64(refcountBlockEntries))
        let blockOffset = try await refcountBlockOffset(ti)
        await hostFile.debugEvent(.refblockLoad)
        let e = try await refcountCache.get(blockOffset)
        let i = Int(cluster % Int64(refcountBlockEntries))
        let old = refcountValue(in: e.bytes, i)
        let new: UInt64
        if delta >= 0 {
            guard maxRefcount - old >= UInt64(delta) else {
                throw BlockError(.corrupt, "Refcount overflow for cluster \(cluster)", path: filename, offset: cluster << Int64(clusterBits))
            }
            new = old + UInt64(delta)
        } else {
            guard old >= UInt64(-delta) else {
                throw await signalCorruption("Refcount underflow for cluster \(cluster)", offset: cluster << Int64(clusterBits))
            }
            new = old - UInt64(-delta)
        }
        setRefcountValue(in: e.bytes, i, new)
        refcountCache.markDirty(e)
        if new == 0 {
            if cluster < freeClusterIndex { freeClusterIndex = cluster }
            // Compressed data must not go on in a cluster that is free again: it may be
            // handed out whole before the next compressed write looks at its count.
            if freeByteOffset != 0 && freeByteOffset >> Int64(clusterBits) == cluster { freeByteOffset = 0 }
            if discardHost {
                // The lock is held, so the cluster cannot be reused before the hole is punched.
                try? await hostFile.discard(at: cluster << Int64(clusterBits), length: Int64(clusterSize))
            }
        }
    }

    /// Makes sure a refcount block covers host cluster `cluster`.
    func ensureRefcountBlock(for cluster: Int64) async throws {
        let ti = Int(cluster / Int64(refcountBlockEntries))
        if ti < refcountTable.count && refcountTable[ti] != 0 { return }
        if ti >= refcountTable.count {
            try await growRefcountTable(covering: ti)
            if refcountTable[ti] != 0 { return }
        }
        // Allocate a block in the first free cluster.
        while true {
            let blockCluster = try await findFreeClusters(1)
            let bti = Int(blockCluster / Int64(refcountBlockEntries))
            let selfDescribing = bti == ti
            if !selfDescribing {
                if bti >= refcountTable.count || refcountTable[bti] == 0 {
                    // The new block's own count needs a block too: make that one first.
                    try await ensureRefcountBlock(for: blockCluster)
                    if refcountTable[ti] != 0 { return }
                    // Then try the same cluster again, as QEMU does.
                    if blockCluster < freeClusterIndex { freeClusterIndex = blockCluster }
                    continue
                }
                // Its own count lives in another block; that update goes to disk first.
                do {
                    try await updateRefcount(blockCluster, by: 1)
                } catch {
                    if blockCluster < freeClusterIndex { freeClusterIndex = blockCluster }
                    throw error
                }
            }
            let blockOffset = blockCluster << Int64(clusterBits)
            do {
                try await installRefcountBlock(blockOffset, tableIndex: ti, selfDescribing: selfDescribing)
            } catch {
                // Nothing points to the block: forget it and give its cluster back (QEMU's
                // alloc_refcount_block leaves the table entry unset the same way).
                refcountCache.discard(blockOffset)
                if !selfDescribing { await releaseUnreferenced(blockCluster, 1) }
                if blockCluster < freeClusterIndex { freeClusterIndex = blockCluster }
                throw error
            }
            return
        }
    }

    /// Writes a new, empty refcount block at `blockOffset` (counting itself when it falls in
    /// its own range) and points refcount table entry `ti` at it, each step on disk before
    /// the next. On failure the in-memory table is as before.
    private func installRefcountBlock(_ blockOffset: Int64, tableIndex ti: Int, selfDescribing: Bool) async throws {
        let blockCluster = blockOffset >> Int64(clusterBits)
        if !selfDescribing {
            try await refcountCache.flush()
            try await hostFile.flush()
        }
        let e = try await refcountCache.getEmpty(blockOffset)
        if selfDescribing {
            setRefcountValue(in: e.bytes, Int(blockCluster % Int64(refcountBlockEntries)), 1)
        }
        // The block must be on disk before the table points to it.
        await hostFile.debugEvent(.refblockAllocWrite)
        try await hostFile.write(at: blockOffset, from: UnsafeRawBufferPointer(e.bytes), flags: [])
        e.dirty = false
        noteAllocated(blockCluster, 1)
        try await hostFile.flush()
        refcountTable[ti] = UInt64(blockOffset)
        await hostFile.debugEvent(.refblockAllocHookup)
        do {
            try await writeRefcountTableEntry(ti)
        } catch {
            refcountTable[ti] = 0
            throw error
        }
    }

    private func writeRefcountTableEntry(_ ti: Int) async throws {
        var v: [UInt8] = []
        v.appendBE64(refcountTable[ti])
        await hostFile.debugEvent(.reftableUpdate)
        try await hostFile.write(at: Int64(header.refcountTableOffset) + Int64(ti * 8), bytes: v)
    }

    /// Grows the refcount table so that entry `index` exists. The new table and the
    /// refcount blocks needed to describe it are placed after the end of the image.
    func growRefcountTable(covering index: Int) async throws {
        await hostFile.debugEvent(.reftableGrow)
        try await refcountCache.flush()
        let cs = Int64(clusterSize)
        let rbe = Int64(refcountBlockEntries)
        let areaStart = endCluster
        let oldEntries = refcountTable.count
        var newEntries = max(index + 1, oldEntries)
        var blocks = 0
        var tableClusters = 0
        var lo = 0, hi = 0
        // Fixed point: the area holds `blocks` new refcount blocks and the table; the table
        // must have an entry for every block index up to the end of the area.
        for _ in 0..<64 {
            tableClusters = Int((Int64(newEntries) * 8 + cs - 1) / cs)
            let areaEnd = areaStart + Int64(blocks + tableClusters)
            lo = min(index, Int(areaStart / rbe))
            hi = Int((areaEnd - 1) / rbe)
            var missing = 0
            for b in lo...hi where b >= oldEntries || refcountTable[b] == 0 { missing += 1 }
            let wantEntries = max(newEntries, hi + 1, oldEntries + oldEntries / 2, index + 1)
            if missing == blocks && wantEntries <= Int(Int64(tableClusters) * cs / 8) {
                newEntries = Int(Int64(tableClusters) * cs / 8)
                break
            }
            blocks = missing
            newEntries = wantEntries
        }
        if Int64(tableClusters) * cs > 8 << 20 {
            // (EFBIG, as QEMU's refcount table growth past QCOW_MAX_REFTABLE_SIZE: a snapshot
            // of an image whose L2 entry points to an absurd offset fails with it, iotests 080.)
            throw BlockError(.noSpace, "Reference count table would exceed its maximum size", errno: EFBIG, path: filename)
        }
        var newTable = refcountTable
        newTable.append(contentsOf: [UInt64](repeating: 0, count: newEntries - oldEntries))
        // Assign new blocks to the missing indexes, in order, at the start of the area.
        var next = areaStart
        var newBlocks: [(index: Int, cluster: Int64)] = []
        for b in lo...hi where newTable[b] == 0 {
            newBlocks.append((b, next))
            newTable[b] = UInt64(next << Int64(clusterBits))
            next += 1
        }
        let tableStart = next
        let areaEnd = tableStart + Int64(tableClusters)
        // Write each new block with the counts of the area clusters it covers.
        let buf = AlignedBuffer(count: clusterSize)
        for nb in newBlocks {
            let first = Int64(nb.index) * rbe
            // SAFETY: `bytes` is only used inside the closure, while `buf` (its `clusterSize` bytes)
            // is alive; `setRefcountValue` indexes below `rbe` entries, which fill one cluster.
            buf.withUnsafeMutableBytes { bytes in
                memset(bytes.baseAddress!, 0, clusterSize)
                // A block for an index before the area (the area starts further on after a growth
                // that failed half-way) counts nothing.
                var c = max(first, areaStart)
                while c < min(first + rbe, areaEnd) {
                    setRefcountValue(in: bytes, Int(c - first), 1)
                    c += 1
                }
            }
            // SAFETY: `buf` is kept alive by the async `withUnsafeBytes` until the write returns.
            await hostFile.debugEvent(.refblockAllocWriteBlocks)
            try await buf.withUnsafeBytes { try await hostFile.write(at: nb.cluster << Int64(clusterBits), from: $0, flags: []) }
            refcountCache.discard(nb.cluster << Int64(clusterBits))
        }
        // Area clusters covered by blocks that already existed. Until the header points to
        // the new table, a failure undoes these counts: nothing refers to the area then.
        var counted: [Int64] = []
        do {
            for c in areaStart..<areaEnd {
                let b = Int(c / rbe)
                if !newBlocks.contains(where: { $0.index == b }) {
                    let off = Int64(newTable[b] & Qcow2Node.l1OffsetMask)
                    let e = try await refcountCache.get(off)
                    let i = Int(c % rbe)
                    setRefcountValue(in: e.bytes, i, refcountValue(in: e.bytes, i) + 1)
                    refcountCache.markDirty(e)
                    counted.append(c)
                }
            }
            try await refcountCache.flush()
            // The new table.
            var raw = [UInt8](repeating: 0, count: tableClusters * clusterSize)
            // SAFETY: `raw` was sized for `newTable.count * 8` bytes (rounded up to clusters), so every
            // 8-byte store fits.
            raw.withUnsafeMutableBytes { b in for (i, v) in newTable.enumerated() { b.setBE64(i * 8, v) } }
            await hostFile.debugEvent(.refblockAllocWriteTable)
            try await hostFile.write(at: tableStart << Int64(clusterBits), bytes: raw)
            noteAllocated(areaStart, areaEnd - areaStart)
            try await hostFile.flush()
            // Switch the header to it (offset and size are adjacent fields: one write).
            var fields: [UInt8] = []
            fields.appendBE64(UInt64(tableStart << Int64(clusterBits)))
            fields.appendBE32(UInt32(tableClusters))
            await hostFile.debugEvent(.refblockAllocSwitchTable)
            try await hostFile.write(at: 48, bytes: fields)
        } catch {
            for c in counted { await releaseUnreferenced(c, 1) }
            throw error
        }
        let oldOffset = Int64(header.refcountTableOffset)
        let oldClusters = Int64(header.refcountTableClusters)
        header.refcountTableOffset = UInt64(tableStart << Int64(clusterBits))
        header.refcountTableClusters = UInt32(tableClusters)
        refcountTable = newTable
        // The old table is free once the header is on disk; if the sync fails, the next
        // flush syncs before applying the free.
        let synced: Error?
        do { try await hostFile.flush(); synced = nil } catch { synced = error }
        if synced == nil {
            try await freeClusters(at: oldOffset, count: oldClusters, discardHost: passDiscard(.other))
        } else {
            pendingFrees.append(PendingFree(cluster: oldOffset >> Int64(clusterBits), count: oldClusters, discardHost: passDiscard(.other)))
        }
        if let synced { throw synced }
    }

    // MARK: Allocation

    /// Finds `count` contiguous free clusters at or after the free-cluster index, without
    /// taking them, and moves the index past them: QEMU's `alloc_clusters_noref`, whose
    /// search order decides the layout of every image it writes.
    func findFreeClusters(_ count: Int64) async throws -> Int64 {
        var start = freeClusterIndex
        var c = start
        while c < start + count {
            if try await refcount(of: c) != 0 { start = c + 1 }
            c += 1
        }
        freeClusterIndex = start + count
        return start
    }

    /// The first cluster of `first..<end` whose refcount block does not exist yet.
    func firstClusterWithoutBlock(_ first: Int64, _ end: Int64) -> Int64? {
        let n = Int64(refcountBlockEntries)
        var c = first
        while c < end {
            let ti = Int(c / n)
            if ti >= refcountTable.count || refcountTable[ti] == 0 { return c }
            c = (c / n + 1) * n
        }
        return nil
    }

    /// Where QEMU's `update_refcount` stops to create the refcount block that cluster `missing`
    /// needs, it undoes what it did to `first..<missing` and has its caller search again,
    /// starting no later than `first` ("try the same ones first").
    func restartAfterNewBlock(_ first: Int64, _ missing: Int64) async throws {
        try await ensureRefcountBlock(for: missing)
        if first < freeClusterIndex { freeClusterIndex = first }
    }

    /// Allocates `count` contiguous clusters and returns the host offset of the first
    /// (QEMU's `qcow2_alloc_clusters`, with the same placement of new refcount blocks: after
    /// the run, which is then searched for again).
    func allocateClusters(_ count: Int64) async throws -> Int64 {
        while true {
            await hostFile.debugEvent(.clusterAlloc)
            let start = try await findFreeClusters(count)
            if let missing = firstClusterWithoutBlock(start, start + count) {
                try await restartAfterNewBlock(start, missing)
                continue
            }
            var counted: Int64 = 0
            do {
                while counted < count {
                    try await updateRefcount(start + counted, by: 1)
                    counted += 1
                }
            } catch {
                await releaseUnreferenced(start, counted)
                if start < freeClusterIndex { freeClusterIndex = start }
                throw error
            }
            noteAllocated(start, count)
            return start << Int64(clusterBits)
        }
    }

    func noteAllocated(_ first: Int64, _ count: Int64) {
        if first + count > endCluster { endCluster = first + count }
    }

    /// Drops one reference to each of `count` clusters starting at host offset `offset`,
    /// after the L2 cache (which dropped the references) reaches the disk. A count that
    /// cannot be changed now because the host file refuses writes is changed at the next
    /// flush (`Qcow2+DeferredFree.swift`): the caller's change stands. Any failure is
    /// posted as a ``BlockNotice`` ("qcow2_free_clusters failed: …"), as QEMU prints it.
    /// - Throws: `.corrupt` on underflow.
    func freeClusters(at offset: Int64, count: Int64, discardHost: Bool = false) async throws {
        let first = offset >> Int64(clusterBits)
        var c = first
        do {
            await hostFile.debugEvent(.clusterFree)
            try await refcountCache.setDependency(on: l2Cache)
            while c < first + count {
                try await updateRefcount(c, by: -1, discardHost: discardHost)
                c += 1
            }
        } catch {
            // QEMU's qcow2_free_clusters reports every failure on stderr (its callers go on).
            BlockNotices.post(.warning, "qcow2_free_clusters failed: \(BlockError.strerror(error.asBlockError.errnoValue))")
            guard isRetryable(error) else { throw error }
            pendingFrees.append(PendingFree(cluster: c, count: first + count - c, discardHost: discardHost))
        }
    }

    /// Frees the clusters holding a compressed cluster's data (it may span two host clusters).
    func freeCompressed(entry: UInt64, discardHost: Bool = false) async throws {
        let (off, size) = compressedLocation(entry)
        let first = off >> Int64(clusterBits)
        let last = (off + Int64(size) - 1) >> Int64(clusterBits)
        try await freeClusters(at: first << Int64(clusterBits), count: last - first + 1, discardHost: discardHost)
    }
}
