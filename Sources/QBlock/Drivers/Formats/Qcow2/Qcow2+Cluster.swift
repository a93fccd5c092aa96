/// Guest-to-host mapping through the L1 and L2 tables (QEMU's `qcow2-cluster.c`).
///
/// An L1 entry points to an L2 table (bit 63: COPIED, the table's refcount is 1). An L2
/// entry is, for a standard cluster, the host offset of the data with bit 63 COPIED and
/// bit 0 "reads as zeros" (v3); with bit 62 set it is a compressed cluster descriptor:
/// the host byte offset in the low `62 - (cluster_bits - 8)` bits and, above them, the
/// number of additional 512-byte sectors the compressed data spans.
extension Qcow2Node {
    enum ClusterKind: Equatable {
        /// Not allocated here: the backing file (or zeros) shows through.
        case unallocated
        /// Reads as zeros, no host cluster.
        case zero
        /// Reads as zeros, a host cluster is kept allocated.
        case zeroAllocated
        /// Data in a host cluster.
        case normal
        /// Compressed data.
        case compressed
    }

    struct Mapping {
        var kind: ClusterKind
        /// Host offset for the first requested byte (normal and zeroAllocated).
        var hostOffset: Int64
        /// Length of the run, in bytes from the requested offset.
        var length: Int64
        /// The raw L2 entry of the first cluster.
        var entry: UInt64
        /// Whether the first cluster's COPIED flag is set (its refcount is exactly one).
        var copied: Bool
    }

    @inline(__always)
    func kind(of entry: UInt64) -> ClusterKind {
        if entry & Qcow2Node.compressedFlag != 0 { return .compressed }
        let off = entry & Qcow2Node.l2OffsetMask
        if entry & Qcow2Node.zeroFlag != 0 && header.version >= 3 {
            return off != 0 ? .zeroAllocated : .zero
        }
        return off != 0 ? .normal : .unallocated
    }

    /// (host byte offset, byte size) of a compressed cluster's data.
    func compressedLocation(_ entry: UInt64) -> (Int64, Int) {
        let shift = UInt64(62 - (clusterBits - 8))
        let sizeMask = (UInt64(1) << UInt64(clusterBits - 8)) - 1
        let offset = entry & ((UInt64(1) << shift) - 1)
        let sectors = ((entry >> shift) & sizeMask) + 1
        let size = Int(sectors * 512) - Int(offset & 511)
        return (Int64(offset), size)
    }

    /// The L2 table offset for L1 index `i` (0 when none), validated. `l1` is a snapshot's
    /// L1 table to use instead of the active one.
    func l2Offset(_ i: Int, in l1: [UInt64]? = nil) async throws -> Int64 {
        let table = l1 ?? l1Table
        guard i < table.count else { return 0 }
        let off = Int64(table[i] & Qcow2Node.l1OffsetMask)
        if off == 0 { return 0 }
        if off & Int64(clusterSize - 1) != 0 {
            throw await signalCorruption("L2 table offset 0x\(String(off, radix: 16)) unaligned (L1 index: 0x\(String(i, radix: 16)))", offset: off)
        }
        let limit = max(hostFile.length, endCluster << Int64(clusterBits))
        if off >= limit {
            throw await signalCorruption("L2 table offset 0x\(String(off, radix: 16)) points past the end of the image file (L1 index: 0x\(String(i, radix: 16)))", offset: off)
        }
        return off
    }

    /// Looks up the mapping of guest `offset`, for a run of at most `maxBytes` within
    /// one L2 table, in the active L1 table or in `l1` (a snapshot's). Call with ``metaLock`` held.
    func lookup(_ offset: Int64, _ maxBytes: Int64, in l1: [UInt64]? = nil) async throws -> Mapping {
        let cs = Int64(clusterSize)
        let inCluster = offset & (cs - 1)
        let guestCluster = offset >> Int64(clusterBits)
        let l1Index = Int(guestCluster / Int64(l2Entries))
        var l2Index = Int(guestCluster % Int64(l2Entries))
        // Bytes up to the end of this L2 table's coverage.
        let tableEnd = (Int64(l1Index) + 1) * Int64(l2Entries) * cs
        let limit = min(maxBytes, tableEnd - offset)
        let l2 = try await l2Offset(l1Index, in: l1)
        if l2 == 0 {
            return Mapping(kind: .unallocated, hostOffset: 0, length: limit, entry: 0, copied: false)
        }
        let table = try await l2Cache.get(l2)
        let b = table.bytes
        let first = b.be64(l2Index * 8)
        let k = kind(of: first)
        let firstHost = Int64(first & Qcow2Node.l2OffsetMask)
        if (k == .normal || k == .zeroAllocated) && firstHost & (cs - 1) != 0 {
            throw await signalCorruption("Cluster allocation offset 0x\(String(firstHost, radix: 16)) unaligned (L2 offset: 0x\(String(l2, radix: 16)), L2 index: 0x\(String(l2Index, radix: 16)))", offset: firstHost)
        }
        var length = min(cs - inCluster, limit)
        if k != .compressed {
            let copied = first & Qcow2Node.copied
            var expectHost = firstHost + cs
            l2Index += 1
            while length < limit && l2Index < l2Entries {
                let e = b.be64(l2Index * 8)
                if kind(of: e) != k || (e & Qcow2Node.copied) != copied { break }
                if k == .normal || k == .zeroAllocated {
                    if Int64(e & Qcow2Node.l2OffsetMask) != expectHost { break }
                    expectHost += cs
                }
                length = min(length + cs, limit)
                l2Index += 1
            }
        }
        return Mapping(kind: k, hostOffset: (k == .normal || k == .zeroAllocated) ? firstHost + inCluster : 0,
                       length: length, entry: first, copied: first & Qcow2Node.copied != 0)
    }

    /// The L2 table for L1 index `i`, ready to be modified: allocated if missing, copied if
    /// shared with a snapshot. Call with ``metaLock`` held.
    func l2TableForWrite(_ i: Int) async throws -> Qcow2MetadataCache.Entry {
        try await markDirtyBeforeMetadataChange()
        let old = try await l2Offset(i)
        if old != 0 && l1Table[i] & Qcow2Node.copied != 0 {
            return try await l2Cache.get(old)
        }
        var contents: [UInt8]?
        if old != 0 {
            await hostFile.debugEvent(.l2AllocCowRead)
            let t = try await l2Cache.get(old)
            contents = Array(UnsafeRawBufferPointer(t.bytes))
        }
        let newOffset = try await allocateClusters(1)
        let oldL1 = l1Table[i]
        do {
            let e = try await l2Cache.getEmpty(newOffset)
            if let contents {
                // SAFETY: `contents` is one cluster, the size of the cache entry's buffer `e.bytes`.
                contents.withUnsafeBytes { e.bytes.copyMemory(from: $0) }
            }
            // The table and its refcount must be on disk before L1 points to it.
            try await l2Cache.setDependency(on: refcountCache)
            await hostFile.debugEvent(.l2AllocWrite)
            try await l2Cache.flush()
            try await refcountCache.flush()
            try await hostFile.flush()
            l1Table[i] = UInt64(newOffset) | Qcow2Node.copied
            try await writeL1Entry(i)
        } catch {
            // L1 does not point to the new table: forget it and give its cluster back, as
            // QEMU's l2_allocate does. A table shared with a snapshot stays as it was.
            l1Table[i] = oldL1
            l2Cache.discard(newOffset)
            await releaseUnreferenced(newOffset >> Int64(clusterBits), 1)
            throw error
        }
        if old != 0 {
            try await freeClusters(at: old, count: 1, discardHost: passDiscard(.other))
        }
        return try await l2Cache.get(newOffset)
    }

    func writeL1Entry(_ i: Int) async throws {
        var v: [UInt8] = []
        v.appendBE64(l1Table[i])
        await hostFile.debugEvent(.l1Update)
        try await hostFile.write(at: Int64(header.l1TableOffset) + Int64(i * 8), bytes: v)
    }

    /// Waits until no allocation covers guest clusters [first, first+count). Returns false
    /// (with the lock released) if it had to wait; the caller then starts over.
    func waitForInflight(_ first: Int64, _ count: Int64) async -> Bool {
        for a in inflight where a.firstCluster < first + count && first < a.firstCluster + a.count {
            metaLock.unlock()
            await a.done.wait()
            return false
        }
        return true
    }
}
