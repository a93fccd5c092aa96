#if canImport(Glibc)
import Glibc
#endif
import QBlockCore
import QBlockGraph

/// Dropping clusters: shrinking the virtual size (QEMU's `qcow2_co_truncate` for a smaller
/// size) and emptying an image after a commit (QEMU's `qcow2_make_empty`).
///
/// Both make guest clusters *unallocated* (L2 entry 0, the backing file shows through),
/// free the host clusters they used, and free L2 tables that no longer map anything.
extension Qcow2Node {
    /// Shrinks the virtual size to `newSize`: the clusters past the new end are discarded,
    /// L2 tables wholly past it are freed (their L1 entries cleared; the L1 table keeps its
    /// size, as in QEMU) and the host file is cut after its last used cluster. Lock held.
    func shrink(to newSize: Int64, preallocation: Preallocation) async throws {
        if preallocation != .off {
            throw BlockError(.unsupported, "Preallocation can't be used for shrinking an image", path: filename, operation: "truncate")
        }
        let cs = Int64(clusterSize)
        let old = Int64(header.size)
        let firstDropped = (newSize + cs - 1) / cs
        let oldClusters = (old + cs - 1) / cs
        do {
            try await dropClustersLocked(from: firstDropped, to: oldClusters)
        } catch {
            let e = error.asBlockError
            throw BlockError(e.code, "Failed to discard cropped clusters: \(e.message)", errno: e.errno, path: filename,
                             operation: "truncate", underlying: e)
        }
        header.size = UInt64(newSize)
        var f: [UInt8] = []
        f.appendBE64(header.size)
        try await l2Cache.flush()
        try await refcountCache.flush()
        try await hostFile.flush()
        try await hostFile.write(at: 24, bytes: f)
        try await hostFile.flush()
        try await truncateUnusedTail()
    }

    /// Cuts the host file after the last cluster whose refcount is not zero. Lock held.
    func truncateUnusedTail() async throws {
        let cs = Int64(clusterSize)
        let fileLength = hostFile.length
        var last = (fileLength + cs - 1) / cs - 1
        while last >= 0, try await refcount(of: last) == 0 { last -= 1 }
        let end = (last + 1) * cs
        if end < fileLength {
            try await l2Cache.flush()
            try await refcountCache.flush()
            try await hostFile.truncate(to: end, preallocation: .off)
            endCluster = last + 1
            if freeClusterIndex > endCluster { freeClusterIndex = endCluster }
        }
    }

    /// Makes every guest cluster unallocated, so that the backing file shows through
    /// everywhere (what `qemu-img commit` leaves in the committed image).
    ///
    /// As QEMU's `qcow2_make_empty`: a version 3 image without snapshots or persistent
    /// bitmaps whose L1 table fits with the header, refcount table and one refcount block
    /// in the clusters one refcount block covers is reset to those clusters
    /// (``makeCompletelyEmptyLocked()``); any other image has each cluster dropped.
    /// - Throws: ``BlockError`` `.readOnly` on a read-only node, I/O errors. A reset that
    ///   fails after it began leaves the node read-only and the image marked dirty, to be
    ///   repaired by the next read-write open.
    public func makeEmpty() async throws {
        try gate.enter(filename, "make empty")
        defer { gate.leave() }
        try checkWritable("make empty")
        let cs = Int64(clusterSize)
        let l1Clusters = (Int64(l1Table.count) * 8 + cs - 1) / cs
        if header.version >= 3 && header.nbSnapshots == 0 && bitmapDirectory.isEmpty
            && header.bitmapsExtensionData() == nil && 3 + l1Clusters <= Int64(refcountBlockEntries) {
            try await metaLock.withLock { try await makeCompletelyEmptyLocked() }
            return
        }
        try await metaLock.withLock {
            await hostFile.debugEvent(.emptyImagePrepare)
            try await dropClustersLocked(from: 0, to: (Int64(header.size) + cs - 1) / cs)
            try await l2Cache.flush()
            try await refcountCache.flush()
            try await hostFile.flush()
            try await truncateUnusedTail()
        }
        try await flushAdmitted()
    }

    /// QEMU's `make_completely_empty`: with the image marked dirty, zeroes the L1 table and
    /// the clusters after the header, points the header at a one-cluster refcount table
    /// (cluster 1), one refcount block (cluster 2) and an empty L1 table (cluster 3), counts
    /// those clusters, marks the image clean and cuts the file after them. The blkdebug
    /// events are QEMU's (`l1_update`, `empty_image_prepare`, `reftable_update`,
    /// `refblock_alloc`). Lock held.
    private func makeCompletelyEmptyLocked() async throws {
        let cs = Int64(clusterSize)
        let l1Bytes = Int64(l1Table.count) * 8
        let l1Clusters = (l1Bytes + cs - 1) / cs
        try await l2Cache.flush()
        try await refcountCache.flush()
        l2Cache.invalidateAll()
        refcountCache.invalidateAll()
        decompressLock.withLock { decompressedCache = nil }
        // Refcounts will not describe the image until the end: the dirty bit says so on disk,
        // and it is not this session's to clear at close if a step fails.
        if !isDirty {
            header.incompatibleFeatures |= Qcow2Header.Incompatible.dirty
            do {
                try await writeHeader()
                try await hostFile.flush()
            } catch {
                header.incompatibleFeatures &= ~Qcow2Header.Incompatible.dirty
                throw error
            }
        }
        dirtyMarkedHere = false
        do {
            await hostFile.debugEvent(.l1Update)
            try await hostFile.writeZeroes(at: Int64(header.l1TableOffset), length: l1Clusters * cs, flags: [])
            l1Table = [UInt64](repeating: 0, count: l1Table.count)
            await hostFile.debugEvent(.emptyImagePrepare)
            try await hostFile.writeZeroes(at: cs, length: (2 + l1Clusters) * cs, flags: [])
            await hostFile.debugEvent(.l1Update)
            await hostFile.debugEvent(.reftableUpdate)
            var fields: [UInt8] = []
            fields.appendBE64(UInt64(3 * cs))
            fields.appendBE64(UInt64(cs))
            fields.appendBE32(1)
            try await hostFile.write(at: 40, bytes: fields)
            try await hostFile.flush()
            header.l1TableOffset = UInt64(3 * cs)
            header.refcountTableOffset = UInt64(cs)
            header.refcountTableClusters = 1
            refcountTable = [UInt64](repeating: 0, count: Int(cs / 8))
            pendingFrees = []
            await hostFile.debugEvent(.refblockAlloc)
            var entry: [UInt8] = []
            entry.appendBE64(UInt64(2 * cs))
            try await hostFile.write(at: cs, bytes: entry)
            try await hostFile.flush()
            refcountTable[0] = UInt64(2 * cs)
            freeClusterIndex = 0
            freeByteOffset = 0
            endCluster = 0
            let first = try await allocateClusters(3 + l1Clusters)
            guard first == 0 else {
                throw BlockError(.internalError, "First cluster in emptied image is in use", path: filename, operation: "make empty")
            }
            try await refcountCache.flush()
            try await hostFile.flush()
        } catch {
            // The image's structures are half rewritten: this node must not write again;
            // the dirty bit makes the next read-write open rebuild the refcounts.
            formatReadOnly.set(true)
            throw error
        }
        try await clearDirtyBitLocked()
        try await hostFile.truncate(to: (3 + l1Clusters) * cs, preallocation: .off)
        endCluster = 3 + l1Clusters
    }

    /// Makes guest clusters [first, end) unallocated and frees what they used. Lock held.
    func dropClustersLocked(from first: Int64, to end: Int64) async throws {
        var cluster = first
        let perTable = Int64(l2Entries)
        while cluster < end {
            let l1Index = Int(cluster / perTable)
            let firstL2 = Int(cluster % perTable)
            let n = min(end - cluster, perTable - Int64(firstL2))
            defer { cluster += n }
            if l1Index >= l1Table.count { break }
            let l2 = try await l2Offset(l1Index)
            if l2 == 0 { continue }
            guard await waitForInflight(cluster, n) else {
                // The lock was released while waiting: take it again and look again.
                await metaLock.lock()
                cluster -= n
                continue
            }
            if firstL2 == 0 && n == perTable {
                try await dropL2Table(l1Index, at: l2)
                continue
            }
            let t = try await l2TableForWrite(l1Index)
            l2Cache.pin(t)
            defer { l2Cache.release(t) }
            for i in firstL2..<(firstL2 + Int(n)) {
                let e = t.bytes.be64(i * 8)
                if e == 0 { continue }
                t.bytes.setBE64(i * 8, 0)
                l2Cache.markDirty(t)
                try await freeEntry(e)
            }
        }
    }

    /// Clears L1 entry `l1Index` and frees its L2 table (and, if the table was not shared
    /// with a snapshot, the clusters it maps). Lock held.
    private func dropL2Table(_ l1Index: Int, at l2: Int64) async throws {
        let shared = l1Table[l1Index] & Qcow2Node.copied == 0
        var entries: [UInt64] = []
        if !shared {
            let t = try await l2Cache.get(l2)
            entries = (0..<l2Entries).map { t.bytes.be64($0 * 8) }.filter { $0 != 0 }
        }
        // The reference goes first: L1 entry cleared on disk before any refcount drops.
        try await l2Cache.flush()
        l1Table[l1Index] = 0
        try await writeL1Entry(l1Index)
        try await hostFile.flush()
        l2Cache.discard(l2)
        try await freeClusters(at: l2, count: 1, discardHost: true)
        for e in entries { try await freeEntry(e) }
    }

    /// Drops the reference an L2 entry holds on its host cluster(s).
    private func freeEntry(_ e: UInt64) async throws {
        switch kind(of: e) {
        case .compressed:
            try await freeCompressed(entry: e, discardHost: true)
        case .normal, .zeroAllocated:
            try await freeClusters(at: Int64(e & Qcow2Node.l2OffsetMask), count: 1, discardHost: true)
        case .zero, .unallocated:
            break
        }
    }
}
