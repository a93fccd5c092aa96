#if canImport(Glibc)
import Glibc
#endif
import QBlockGraph

/// Consistency check and repair (QEMU's `qcow2_check_refcounts`).
///
/// Every reference to a host cluster — header, L1 tables (active and snapshots), L2
/// tables, data and compressed clusters, the snapshot table, bitmap structures, the
/// refcount table and blocks — is counted in memory and compared with the stored
/// refcounts. A stored count above the references is a leak; below, a corruption.
/// Repair fixes leaks in place; with corruptions (`-r all`) the COPIED flags are
/// corrected and the refcount structure is rebuilt at the end of the file.
extension Qcow2Node {
    /// Checks the image's metadata as `qemu-img check` does: refcounts against the clusters
    /// really used, L1/L2 entries, leaks and corruptions; with `repair` it fixes leaks
    /// (`-r leaks`) or everything it can (`-r all`).
    /// - Returns: the counts `qemu-img check` prints.
    /// - Throws: ``BlockError`` `.readOnly` when repairing a read-only node, `.closed`, or I/O errors.
    public func check(repair: CheckRepair?) async throws -> CheckResult {
        try gate.enter(filename, "check")
        defer { gate.leave() }
        if repair != nil { try checkWritable("check") }
        await metaLock.lock()
        defer { metaLock.unlock() }
        try await l2Cache.flush()
        try await refcountCache.flush()
        var result = try await countReferences(includeRefcountStructure: true, repair: repair)
        if let repair {
            try await applyRepair(repair, &result)
        }
        // A repair that leaves the image consistent makes it clean (QEMU's qcow2_mark_clean
        // after a check with fixes): its refcounts were just verified or rebuilt.
        if repair != nil && isDirty && result.result.corruptions == 0 && result.result.leaks == 0
            && result.result.checkErrors == 0 {
            try await clearDirtyBitLocked()
        }
        result.result.notClosedCleanly = isDirty
        return result.result
    }

    struct ReferenceCount {
        var result = CheckResult()
        var refs: [UInt64] = []
        /// Active-L1 entries whose COPIED flag disagrees with the refcount: (l1 index, l2 index or -1).
        var copiedErrors: [(Int, Int)] = []
        /// A repairing count found a refcount of 0 below its references: `-r all` rebuilds
        /// the refcount structure.
        var rebuild = false
    }

    private func addRef(_ rc: inout ReferenceCount, _ offset: Int64, _ bytes: Int64, _ what: String) {
        guard bytes > 0 else { return }
        let cs = Int64(clusterSize)
        // As QEMU's qcow2_inc_refcounts_imrt: the last cluster may reach past the end of the
        // file by less than a cluster, anything further is a corruption and is not counted.
        if offset > hostFile.length + cs - bytes {
            rc.result.messages.append("ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x\(String(offset, radix: 16)) size 0x\(String(bytes, radix: 16))")
            rc.result.corruptions += 1
            return
        }
        let first = offset / cs
        let last = (offset + bytes - 1) / cs
        for c in first...last {
            if c >= Int64(rc.refs.count) {
                if c > (Int64(1) << 40) / cs { // absurd: more than 1 TiB past anything
                    rc.result.messages.append("ERROR: \(what) at offset \(offset) is far beyond the end of the image")
                    rc.result.corruptions += 1
                    return
                }
                rc.refs.append(contentsOf: [UInt64](repeating: 0, count: Int(c) + 1 - rc.refs.count))
            }
            rc.refs[Int(c)] += 1
        }
    }

    private func readTable(_ offset: Int64, entries: Int) async throws -> [UInt64] {
        let raw = try await hostFile.read(at: offset, count: entries * 8)
        // SAFETY: `raw` holds `entries * 8` bytes (read for that many entries); the reads stay inside
        // the closure.
        return raw.withUnsafeBytes { b in (0..<entries).map { b.be64($0 * 8) } }
    }

    /// Counts references from one L1 table (active or a snapshot's).
    private func countL1(_ rc: inout ReferenceCount, l1Offset: Int64, l1: [UInt64], active: Bool) async throws {
        let cs = Int64(clusterSize)
        let fileEnd = hostFile.length
        addRef(&rc, l1Offset, Int64(l1.count) * 8, "L1 table")
        var nextContiguous: Int64 = 0
        for (i, e) in l1.enumerated() {
            let l2 = Int64(e & Qcow2Node.l1OffsetMask)
            if l2 == 0 { continue }
            if l2 & (cs - 1) != 0 {
                rc.result.messages.append("ERROR l2_offset=\(String(l2, radix: 16)): Table is not cluster aligned; L1 entry corrupted")
                rc.result.corruptions += 1
                continue
            }
            addRef(&rc, l2, cs, "L2 table")
            // Past the end of the file (reported by addRef) the table reads as zeros: nothing more.
            if l2 >= fileEnd { continue }
            let table = try await readTable(l2, entries: l2Entries)
            for (j, le) in table.enumerated() {
                switch kind(of: le) {
                case .compressed:
                    let (off, size) = compressedLocation(le)
                    if active {
                        // Compressed clusters count as fragmented: adjacent ones share sectors.
                        rc.result.allocatedClusters += 1
                        rc.result.compressedClusters += 1
                        rc.result.fragmentedClusters += 1
                    }
                    addRef(&rc, off, Int64(size), "compressed cluster")
                case .normal, .zeroAllocated:
                    let off = Int64(le & Qcow2Node.l2OffsetMask)
                    if off & (cs - 1) != 0 {
                        rc.result.messages.append("ERROR offset=\(String(off, radix: 16)): Cluster is not properly aligned; L2 entry corrupted")
                        rc.result.corruptions += 1
                        continue
                    }
                    if active {
                        rc.result.allocatedClusters += 1
                        if nextContiguous != 0 && off != nextContiguous { rc.result.fragmentedClusters += 1 }
                        nextContiguous = off + cs
                    }
                    addRef(&rc, off, cs, "data cluster")
                    _ = (i, j)
                default: break
                }
            }
        }
    }

    /// Counts every reference in the image. Lock held, caches flushed.
    /// - Parameters:
    ///   - repair: the repair that will follow (its "Repairing" lines are added); a
    ///     repairing count leaves the COPIED flags to ``applyRepair(_:_:)``.
    ///   - checkCopied: whether a plain count compares the COPIED flags too.
    func countReferences(includeRefcountStructure: Bool, repair: CheckRepair? = nil,
                         checkCopied: Bool = true) async throws -> ReferenceCount {
        let cs = Int64(clusterSize)
        var rc = ReferenceCount()
        let fileEnd = hostFile.length
        rc.refs = [UInt64](repeating: 0, count: Int((fileEnd + cs - 1) / cs))
        rc.result.totalClusters = (Int64(header.size) + cs - 1) / cs
        addRef(&rc, 0, cs, "header")
        try await countL1(&rc, l1Offset: Int64(header.l1TableOffset), l1: l1Table, active: true)
        // Snapshots.
        if header.nbSnapshots > 0 {
            let snaps = try await readSnapshotTable()
            addRef(&rc, Int64(header.snapshotsOffset), Int64(snaps.tableBytes), "snapshot table")
            for (sn, s) in zip(snapshotList, snaps.l1s) {
                // QEMU's words for an entry whose L1 table is misplaced or too large.
                if sn.l1TableOffset % UInt64(cs) != 0 {
                    rc.result.messages.append("ERROR snapshot \(sn.id) (\(sn.name)) l1_offset=0x\(String(sn.l1TableOffset, radix: 16)): L1 table is not cluster aligned; snapshot table entry corrupted")
                    rc.result.corruptions += 1
                    continue
                }
                if sn.l1Size > (32 << 20) / 8 {
                    rc.result.messages.append("ERROR snapshot \(sn.id) (\(sn.name)) l1_size=0x\(String(sn.l1Size, radix: 16)): L1 table is too large; snapshot table entry corrupted")
                    rc.result.corruptions += 1
                    continue
                }
                if s.offset < 0 || s.offset >= fileEnd {
                    rc.result.messages.append("ERROR snapshot L1 table offset \(s.offset) is invalid")
                    rc.result.corruptions += 1
                    continue
                }
                let l1 = try await readTable(s.offset, entries: s.size)
                try await countL1(&rc, l1Offset: s.offset, l1: l1, active: false)
            }
        }
        // Persistent bitmaps.
        if header.autoclearFeatures & Qcow2Header.autoclearBitmaps != 0,
           let ext = header.otherExtensions.first(where: { $0.type == Qcow2Header.ExtensionType.bitmaps.rawValue }) {
            try await countBitmaps(&rc, ext.data)
        }
        // A refcount block the table cannot point at: `-r all` rebuilds the structure (QEMU's
        // check_refblocks asks for a rebuild).
        var brokenRefblock = false
        if includeRefcountStructure {
            addRef(&rc, Int64(header.refcountTableOffset), Int64(header.refcountTableClusters) * cs, "refcount table")
            for (i, e) in refcountTable.enumerated() where e != 0 {
                let off = Int64(e & Qcow2Node.l1OffsetMask)
                if off & (cs - 1) != 0 {
                    rc.result.messages.append("ERROR refcount block \(i) is not cluster aligned; refcount table entry corrupted")
                    rc.result.corruptions += 1
                    brokenRefblock = true
                    continue
                }
                if off >= fileEnd {
                    rc.result.messages.append("ERROR refcount block \(i) is outside image")
                    rc.result.corruptions += 1
                    brokenRefblock = true
                    continue
                }
                addRef(&rc, off, cs, "refcount block")
            }
        }
        // Compare.
        let coveredClusters = Int64(refcountTable.count) * Int64(refcountBlockEntries)
        let limit = max(Int64(rc.refs.count), min(coveredClusters, (fileEnd + cs - 1) / cs))
        var highest: Int64 = -1
        var mismatches: [(cluster: Int64, stored: UInt64, computed: UInt64)] = []
        for c in 0..<limit {
            let computed = c < Int64(rc.refs.count) ? rc.refs[Int(c)] : 0
            let stored: UInt64
            do {
                stored = try await refcount(of: c)
            } catch {
                // As QEMU's compare_refcounts: reported, counted, and the check goes on (a
                // block that cannot be used is EIO there).
                rc.result.messages.append("Can't get refcount for cluster \(c): \(String(cString: strerror(EIO)))")
                rc.result.checkErrors += 1
                continue
            }
            if computed > 0 || stored > 0 { highest = c }  // QEMU counts leaked clusters too
            if stored < computed {
                rc.result.messages.append("ERROR cluster \(c) refcount=\(stored) reference=\(computed)")
                rc.result.corruptions += 1
            } else if stored > computed {
                rc.result.messages.append("Leaked cluster \(c) refcount=\(stored) reference=\(computed)")
                rc.result.leaks += 1
            }
            if stored != computed { mismatches.append((c, stored, computed)) }
        }
        // As QEMU's qcow2_check_refcounts: with a repair that is not a rebuild, the comparison
        // runs again fixing in place, "Repairing" what the mode fixes.
        let rebuild = repair == .all && (brokenRefblock || mismatches.contains { $0.stored == 0 })
        if repair != nil && !rebuild {
            for (c, stored, computed) in mismatches {
                let fixing = stored != 0 && (stored > computed ? repair != nil : repair == .all)
                let label = fixing ? "Repairing" : stored < computed ? "ERROR" : "Leaked"
                rc.result.messages.append("\(label) cluster \(c) refcount=\(stored) reference=\(computed)")
            }
        }
        rc.rebuild = rebuild
        // COPIED flags: a plain check looks at them now; a repair after it has fixed the
        // refcounts (``applyRepair(_:_:)``), as QEMU's check_oflag_copied.
        if repair == nil && checkCopied { try await checkCopiedFlags(&rc, repairing: false) }
        rc.result.imageEndOffset = (highest + 1) * cs
        return rc
    }

    /// Compares the COPIED flags of the active L1 and L2 entries with the stored refcounts
    /// (QEMU's check_oflag_copied): each mismatch is a corruption, reported "ERROR", or
    /// "Repairing" when `repairing` (the caller then fixes ``ReferenceCount/copiedErrors``).
    /// Lock held.
    private func checkCopiedFlags(_ rc: inout ReferenceCount, repairing: Bool) async throws {
        let cs = Int64(clusterSize)
        let fileEnd = hostFile.length
        for (i, e) in l1Table.enumerated() {
            let l2 = Int64(e & Qcow2Node.l1OffsetMask)
            if l2 == 0 || l2 & (cs - 1) != 0 || l2 >= fileEnd { continue }
            // As QEMU's check_oflag_copied: a refcount that cannot be read is skipped silently.
            guard let stored = try? await refcount(of: l2 / cs) else { continue }
            if (stored == 1) != (e & Qcow2Node.copied != 0) {
                rc.result.messages.append("\(repairing ? "Repairing" : "ERROR") OFLAG_COPIED L2 cluster: l1_index=\(i) l1_entry=\(String(e, radix: 16)) refcount=\(stored)")
                rc.result.corruptions += 1
                rc.copiedErrors.append((i, -1))
            }
            let table = try await readTable(l2, entries: l2Entries)
            for (j, le) in table.enumerated() {
                let k = kind(of: le)
                guard k == .normal || k == .zeroAllocated else { continue }
                let off = Int64(le & Qcow2Node.l2OffsetMask)
                if off & (cs - 1) != 0 || off >= fileEnd + cs * 1024 { continue }
                guard let r = try? await refcount(of: off / cs) else { continue }
                if (r == 1) != (le & Qcow2Node.copied != 0) {
                    rc.result.messages.append("\(repairing ? "Repairing" : "ERROR") OFLAG_COPIED data cluster: l2_entry=\(String(le, radix: 16)) refcount=\(r)")
                    rc.result.corruptions += 1
                    rc.copiedErrors.append((i, j))
                }
            }
        }
    }

    struct SnapshotTable {
        var tableBytes = 0
        var l1s: [(offset: Int64, size: Int)] = []
    }

    /// The L1 locations of the internal snapshots and the table size, from the table read
    /// at open (`Qcow2+SnapshotTable.swift`).
    func readSnapshotTable() async throws -> SnapshotTable {
        var t = SnapshotTable()
        t.tableBytes = snapshotTableSize
        // (An offset past Int64.max is as invalid as an unaligned one: -1 is reported as such.)
        t.l1s = snapshotList.map { (Int64(exactly: $0.l1TableOffset) ?? -1, Int($0.l1Size)) }
        return t
    }

    /// Counts the clusters used by persistent bitmaps (the bitmap directory, tables and data).
    private func countBitmaps(_ rc: inout ReferenceCount, _ ext: [UInt8]) async throws {
        guard ext.count >= 24 else { return }
        let count = Int(ext.be32(0))
        // (Untrusted: values past Int64.max are as invalid as any other out of range.)
        let dirSize = Int64(exactly: ext.be64(8)) ?? -1
        let dirOffset = Int64(exactly: ext.be64(16)) ?? -1
        guard dirSize > 0, dirSize < 64 << 20, dirOffset >= 0 else { return }
        addRef(&rc, dirOffset, dirSize, "bitmap directory")
        let dir = try await hostFile.read(at: dirOffset, count: Int(dirSize))
        var p = 0
        for _ in 0..<count {
            guard p + 24 <= dir.count else { break }
            let tableOffset = Int64(exactly: dir.be64(p)) ?? 0
            let tableSize = Int(dir.be32(p + 8))
            let nameLen = Int(UInt16(dir[p + 18]) << 8 | UInt16(dir[p + 19]))
            let extra = Int(dir.be32(p + 20))
            if tableOffset != 0 && tableSize > 0 {
                addRef(&rc, tableOffset, Int64(tableSize) * 8, "bitmap table")
                let table = try await readTable(tableOffset, entries: tableSize)
                for e in table {
                    let off = Int64(e & 0x00ff_ffff_ffff_fe00)
                    if off != 0 { addRef(&rc, off, Int64(clusterSize), "bitmap data") }
                }
            }
            p += (24 + extra + nameLen + 7) & ~7
        }
    }

    /// Repairs what ``countReferences`` found. Lock held.
    ///
    /// As QEMU's qcow2_check_refcounts: a refcount of 0 below its references (`-r all`)
    /// rebuilds the refcount structure from the counted references ("Rebuilding refcount
    /// structure"), after which the old structure's clusters are leaked and freed
    /// ("Repairing cluster …"); otherwise the mismatched counts the mode fixes are set in
    /// place. The COPIED flags are compared after that, with the new counts, and fixed with
    /// `-r all`, or with `-r leaks` when nothing else is left wrong.
    private func applyRepair(_ mode: CheckRepair, _ rc: inout ReferenceCount) async throws {
        let before = rc.result
        var messages = before.messages
        if rc.rebuild {
            messages.append("Rebuilding refcount structure")
            try await rebuildRefcounts(refs: rc.refs)
            let recount = try await countReferences(includeRefcountStructure: true, checkCopied: false)
            var broken = false
            try await adjustRefcounts(recount.refs, leaks: true, corruptions: false) { c, stored, computed in
                if stored > computed {
                    messages.append("Repairing cluster \(c) refcount=\(stored) reference=\(computed)")
                } else {
                    messages.append("Leaked cluster \(c) refcount=\(stored) reference=\(computed)")
                    broken = true
                }
            }
            if broken { messages.append("ERROR rebuilt refcount structure is still broken") }
        } else if before.leaks > 0 || (mode == .all && before.corruptions > 0) {
            // The "Repairing" lines were added by the count.
            try await adjustRefcounts(rc.refs, leaks: true, corruptions: mode == .all) { _, _, _ in }
        }
        let repairingCopied = mode == .all || (before.corruptions == 0 && before.checkErrors == 0)
        var copied = ReferenceCount()
        try await checkCopiedFlags(&copied, repairing: repairingCopied)
        messages += copied.result.messages
        if repairingCopied && !copied.copiedErrors.isEmpty { try await fixCopiedFlags(copied.copiedErrors) }
        // Clear the corrupt bit once repaired.
        var after = try await countReferences(includeRefcountStructure: true)
        if after.result.corruptions == 0 && isCorrupt {
            header.incompatibleFeatures &= ~Qcow2Header.Incompatible.corrupt
            try await writeHeader()
            try await hostFile.flush()
        }
        after.result.corruptionsFixed = max(0, before.corruptions + copied.result.corruptions - after.result.corruptions)
        after.result.leaksFixed = max(0, before.leaks - after.result.leaks)
        after.result.messages = messages
        rc = after
    }

    /// Sets each stored refcount that differs from `refs` to it: those above (`leaks`) and
    /// those below but not 0 (`corruptions`); `mismatch` sees every difference first
    /// (cluster, stored, computed). Lock held.
    private func adjustRefcounts(_ refs: [UInt64], leaks: Bool, corruptions: Bool,
                                 _ mismatch: (Int64, UInt64, UInt64) -> Void) async throws {
        let cs = Int64(clusterSize)
        let fileClusters = (hostFile.length + cs - 1) / cs
        let limit = max(Int64(refs.count), fileClusters)
        for c in 0..<limit {
            let computed = c < Int64(refs.count) ? refs[Int(c)] : 0
            guard let stored = try? await refcount(of: c), stored != computed else { continue }
            mismatch(c, stored, computed)
            if stored > computed && leaks {
                try await updateRefcount(c, by: -Int64(stored - computed))
            } else if stored < computed && stored != 0 && corruptions {
                try await updateRefcount(c, by: Int64(computed - stored))
            }
        }
        try await refcountCache.flush()
        try await hostFile.flush()
    }

    private func fixCopiedFlags(_ errors: [(Int, Int)]) async throws {
        let cs = Int64(clusterSize)
        for (i, j) in errors {
            let e = l1Table[i]
            let l2 = Int64(e & Qcow2Node.l1OffsetMask)
            if j < 0 {
                let r = try await refcount(of: l2 / cs)
                l1Table[i] = r == 1 ? (e | Qcow2Node.copied) : (e & ~Qcow2Node.copied)
                try await writeL1Entry(i)
            } else {
                let t = try await l2Cache.get(l2)
                let le = t.bytes.be64(j * 8)
                let r = try await refcount(of: Int64(le & Qcow2Node.l2OffsetMask) / cs)
                t.bytes.setBE64(j * 8, r == 1 ? (le | Qcow2Node.copied) : (le & ~Qcow2Node.copied))
                l2Cache.markDirty(t)
            }
        }
        try await l2Cache.flush()
        try await hostFile.flush()
    }

    /// Writes a new refcount table and blocks holding `refs` (the references counted with
    /// the old refcount structure, which is leaked afterwards, as in QEMU) after the end of
    /// the image, and switches the header to them.
    private func rebuildRefcounts(refs: [UInt64]) async throws {
        let built = try await writeRefcountStructure(refs: refs, order: Int(header.refcountOrder))
        let cs = Int64(clusterSize)
        header.refcountTableOffset = UInt64(built.tableStart * cs)
        header.refcountTableClusters = UInt32(built.tableClusters)
        var f: [UInt8] = []
        f.appendBE64(header.refcountTableOffset)
        f.appendBE32(header.refcountTableClusters)
        try await hostFile.write(at: 48, bytes: f)
        try await hostFile.flush()
        refcountTable = built.table
        refcountCache.invalidateAll()
        freeClusterIndex = 0
        noteAllocated(built.areaStart, built.areaEnd - built.areaStart)
    }
}
