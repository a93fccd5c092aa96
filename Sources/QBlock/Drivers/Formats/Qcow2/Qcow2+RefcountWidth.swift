#if canImport(Glibc)
import Glibc
#endif
import QBlockCore

/// Changing the refcount entry width of an existing image (`qemu-img amend -o
/// refcount_bits=N`, QEMU's `qcow2_change_refcount_order`).
///
/// The new refcount blocks and table are written past the end of the image while the old
/// structure stays in force; one header write (refcount order and table location, both in
/// the first sector) switches to them, after which the old blocks and table are free
/// space. A crash before the header write leaves the old structure and some unreferenced
/// space past its end (a leak at worst); after it, the new structure is complete.
extension Qcow2Node {
    /// Rewrites the refcount structure with entries `bits` wide. Lock not held.
    /// - Throws: `.invalidArgument` "Cannot decrease refcount entry width to N bits:
    ///   Cluster at offset 0x… has a refcount of R" when a count does not fit.
    func changeRefcountWidth(to bits: Int) async throws {
        let newOrder = bits.trailingZeroBitCount
        try await metaLock.withLock {
            guard newOrder != Int(header.refcountOrder) else { return }
            try await l2Cache.flush()
            try await refcountCache.flush()
            try await hostFile.flush()
            let cs = Int64(clusterSize)
            let fileClusters = (hostFile.length + cs - 1) / cs
            // The counts as stored, as QEMU copies them; the old structure's own clusters
            // become free once the header points at the new one.
            var refs = [UInt64](repeating: 0, count: Int(fileClusters))
            for c in 0..<fileClusters {
                let r = try await refcount(of: c)
                if bits < 64 && r >> UInt64(bits) != 0 {
                    throw BlockError(.invalidArgument,
                        "Cannot decrease refcount entry width to \(bits) bits: Cluster at offset 0x\(String(c * cs, radix: 16)) has a refcount of \(r)",
                        path: filename, operation: "amend")
                }
                refs[Int(c)] = r
            }
            let oldTableStart = Int64(header.refcountTableOffset) / cs
            for c in oldTableStart..<(oldTableStart + Int64(header.refcountTableClusters)) where c < fileClusters {
                refs[Int(c)] = 0
            }
            for e in refcountTable where e & Qcow2Node.l1OffsetMask != 0 {
                let c = Int64(e & Qcow2Node.l1OffsetMask) / cs
                if c < fileClusters { refs[Int(c)] = 0 }
            }
            let built = try await writeRefcountStructure(refs: refs, order: newOrder)
            header.refcountOrder = UInt32(newOrder)
            header.refcountTableOffset = UInt64(built.tableStart * cs)
            header.refcountTableClusters = UInt32(built.tableClusters)
            try await writeHeader()
            try await hostFile.flush()
            refcountBlockEntries = clusterSize * 8 / bits
            refcountTable = built.table
            refcountCache.invalidateAll()
            freeClusterIndex = 0
            noteAllocated(built.areaStart, built.areaEnd - built.areaStart)
        }
    }

    /// Writes refcount blocks (entries `1 << order` bits wide) and a table describing
    /// `refs` plus the new structure itself, in fresh clusters past both the file end and
    /// every cluster `refs` counts. Nothing existing is overwritten; the header is not
    /// touched. Lock held.
    func writeRefcountStructure(refs counted: [UInt64], order: Int) async throws
        -> (tableStart: Int64, tableClusters: Int64, table: [UInt64], areaStart: Int64, areaEnd: Int64)
    {
        let cs = Int64(clusterSize)
        let rbe = cs * 8 / Int64(1 << order)
        var refs = counted
        var areaStart = max(Int64(refs.count), (hostFile.length + cs - 1) / cs)
        if let lastUsed = refs.lastIndex(where: { $0 > 0 }) { areaStart = max(areaStart, Int64(lastUsed) + 1) }
        var blocks: Int64 = 0
        var tableClusters: Int64 = 1
        for _ in 0..<64 {
            let areaEnd = areaStart + blocks + tableClusters
            let needBlocks = (areaEnd + rbe - 1) / rbe
            let needTable = (needBlocks * 8 + cs - 1) / cs
            if needBlocks == blocks && needTable == tableClusters { break }
            blocks = needBlocks
            tableClusters = needTable
        }
        let areaEnd = areaStart + blocks + tableClusters
        if Int64(refs.count) < areaEnd { refs.append(contentsOf: [UInt64](repeating: 0, count: Int(areaEnd) - refs.count)) }
        for c in areaStart..<areaEnd { refs[Int(c)] = 1 }
        let maxValue: UInt64 = order == 6 ? .max : (1 << UInt64(1 << order)) - 1
        var table = [UInt64](repeating: 0, count: Int(tableClusters * cs / 8))
        let buf = AlignedBuffer(count: clusterSize)
        for b in 0..<blocks {
            let first = b * rbe
            let slice = refs[Int(first)..<Int(min(first + rbe, Int64(refs.count)))]
            let blockCluster = areaStart + b
            // SAFETY: `buf` is one cluster, and a refcount block covers at most `rbe` entries of the
            // new width, so every store fits; used only inside the closure.
            buf.withUnsafeMutableBytes { bytes in
                bytes.initializeMemory(as: UInt8.self, repeating: 0)
                for (k, v) in slice.enumerated() where v > 0 {
                    Qcow2Node.setRefcountValue(order: order, in: bytes, k, min(v, maxValue))
                }
            }
            // SAFETY: `buf` stays alive (kept by the async `withUnsafeBytes`) until the write returns.
            try await buf.withUnsafeBytes { try await hostFile.write(at: blockCluster * cs, from: $0, flags: []) }
            table[Int(b)] = UInt64(blockCluster * cs)
        }
        let tableStart = areaStart + blocks
        var raw: [UInt8] = []
        raw.reserveCapacity(table.count * 8)
        for v in table { raw.appendBE64(v) }
        try await hostFile.write(at: tableStart * cs, bytes: raw)
        try await hostFile.flush()
        return (tableStart, tableClusters, table, areaStart, areaEnd)
    }
}
