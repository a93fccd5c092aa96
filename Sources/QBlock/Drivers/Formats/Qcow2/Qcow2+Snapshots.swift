#if canImport(Glibc)
import Glibc
#endif
import QBlockCore
import QBlockGraph

/// Internal snapshots: create, apply (revert to), delete, list, and read a snapshot's
/// content (QEMU's `qcow2-snapshot.c` and `qcow2_update_snapshot_refcount`).
///
/// A snapshot is a copy of the active L1 table plus one more reference on every L2 table
/// and data cluster it reaches. While a cluster is shared its refcount is above one and its
/// COPIED flag is clear, so the write path copies it before changing it (L2 tables in
/// `l2TableForWrite`, data clusters in the allocating write). The snapshot's own tree is
/// therefore never modified.
///
/// Every operation holds ``metaLock`` from start to end and first waits for allocating
/// writes in flight. Like QEMU, which drains the node around snapshot operations, callers
/// must not have other requests running on the node meanwhile: a write that overwrites a
/// cluster in place could otherwise land in the snapshot.
///
/// Crash safety (docs/architecture.md, "Ordering of metadata writes"): refcounts are
/// raised and on disk before a new reference to them (the snapshot table entry, a new
/// active L1) is written; references are dropped (snapshot table rewritten, active L1
/// replaced) and synced before counts are lowered. A crash at any point leaves at worst
/// leaked clusters (and, as with QEMU, COPIED flags that `check -r all` corrects).
extension Qcow2Node {
    // MARK: Public API

    /// The internal snapshots, in table order.
    public func snapshots() -> [Qcow2Snapshot] { snapshotList }

    /// Creates an internal snapshot of the current disk content, as `qemu-img snapshot -c`
    /// does: a disk-only snapshot (no VM state) with the next free numeric id, dated now
    /// (microsecond precision, like qemu-img) and icount 0.
    /// - Parameter name: the snapshot's name (tag). Names need not be unique.
    /// - Parameter icount: the instruction count stored with it (nil: none, QEMU's -1).
    /// - Returns: the new snapshot's table entry.
    /// - Throws: ``BlockError`` `.readOnly` on a read-only node; `.invalidArgument` for a name
    ///   longer than 65535 bytes; `.noSpace` (EFBIG) past 65536 snapshots; `.corrupt` for
    ///   damaged metadata; I/O errors. On failure the image is unchanged apart from possibly
    ///   leaked clusters.
    @discardableResult
    public func createSnapshot(name: String, icount: UInt64? = 0) async throws -> Qcow2Snapshot {
        try gate.enter(filename, "snapshot create")
        defer { gate.leave() }
        try checkWritable("snapshot create")
        if name.utf8.count > Int(UInt16.max) {
            throw BlockError(.invalidArgument, "Snapshot name too long", path: filename, operation: "snapshot create")
        }
        var tv = timeval()
        gettimeofday(&tv, nil)
        return try await withDrainedMetadata {
            if snapshotList.count >= Qcow2Snapshot.maxCount {
                throw BlockError(.noSpace, "Too many snapshots", errno: EFBIG, path: filename, operation: "snapshot create")
            }
            let id = nextSnapshotID()
            // The copy of the active L1 table, entries as they are.
            let l1Bytes = Int64(l1Table.count) * 8
            let cs = Int64(clusterSize)
            var l1Offset: Int64 = 0
            if l1Bytes > 0 {
                l1Offset = try await allocateClusters((l1Bytes + cs - 1) / cs)
                var raw: [UInt8] = []
                raw.reserveCapacity(Int(l1Bytes))
                for e in l1Table { raw.appendBE64(e) }
                try await hostFile.write(at: l1Offset, bytes: raw)
            }
            // One more reference on everything the active table reaches; COPIED flags cleared.
            let newActive = try await updateTreeRefcounts(l1Table, by: 1)
            try await syncCaches()
            if newActive != l1Table {
                try await writeActiveL1(newActive)
                l1Table = newActive
            }
            let snapshot = Qcow2Snapshot(id: id, name: name, dateSeconds: UInt32(truncatingIfNeeded: tv.tv_sec),
                                         dateNanoseconds: UInt32(tv.tv_usec) * 1000, vmClockNanoseconds: 0,
                                         vmStateSize: 0, diskSize: header.size, icount: icount,
                                         l1TableOffset: UInt64(l1Offset), l1Size: UInt32(l1Table.count))
            try await writeSnapshotTable(snapshotList + [snapshot])
            return snapshot
        }
    }

    /// Reverts the disk to a snapshot (QEMU's `qcow2_snapshot_goto`, `qemu-img snapshot -a`):
    /// the snapshot's L1 table becomes the active one and what only the current state
    /// referenced is freed. The snapshot itself remains. If the snapshot was taken at another
    /// disk size, the virtual size becomes the snapshot's, as QEMU 7.2 does.
    /// - Parameter idOrName: matched against ids first, then names (QEMU's
    ///   `find_snapshot_by_id_or_name`).
    /// - Throws: ``BlockError`` `.notFound` ("Failed to load snapshot: No such file or
    ///   directory") when no snapshot matches; `.readOnly`; `.corrupt`; I/O errors.
    public func applySnapshot(idOrName: String) async throws {
        try gate.enter(filename, "snapshot apply")
        defer { gate.leave() }
        try checkWritable("snapshot apply")
        // QEMU's bdrv_snapshot_goto: bitmaps would not describe the reverted content.
        if !persistentBitmaps.isEmpty {
            throw BlockError(.busy, "Device has active dirty bitmaps", errno: EBUSY, path: filename, operation: "snapshot apply")
        }
        try await withDrainedMetadata {
            guard let sn = findSnapshot(id: idOrName, name: nil) ?? findSnapshot(id: nil, name: idOrName) else {
                throw BlockError(.notFound, "Failed to load snapshot: No such file or directory", errno: ENOENT,
                                 path: filename, operation: "snapshot apply")
            }
            var snL1 = try await readSnapshotL1(sn)
            let cs = Int64(clusterSize)
            let coverage = cs * Int64(l2Entries)
            let neededForSize = Int((Int64(sn.diskSize) + coverage - 1) / coverage)
            let entries = max(l1Table.count, snL1.count, neededForSize)
            if entries > l1Table.count { try await growL1(to: entries) }
            snL1.append(contentsOf: [UInt64](repeating: 0, count: l1Table.count - snL1.count))
            // Count the snapshot's tree once more, before anything points to it.
            let counted = try await updateTreeRefcounts(snL1, by: 1)
            try await syncCaches()
            if sn.l1Size > 0 && Array(counted.prefix(Int(sn.l1Size))) != Array(snL1.prefix(Int(sn.l1Size))) {
                // QEMU rewrites the snapshot's L1 with the COPIED flags cleared as well.
                try await writeL1(Array(counted.prefix(Int(sn.l1Size))), at: Int64(sn.l1TableOffset))
            }
            // Switch: the active L1 now holds the snapshot's entries (COPIED clear: every
            // table it reaches is shared until the flags are recomputed below).
            let old = l1Table
            try await writeActiveL1(counted)
            l1Table = counted
            if sn.diskSize != header.size {
                header.size = sn.diskSize
                var f: [UInt8] = []
                f.appendBE64(header.size)
                try await hostFile.write(at: 24, bytes: f)
                try await hostFile.flush()
            }
            // Drop the references of the previous state, then set COPIED where counts are 1.
            _ = try await updateTreeRefcounts(old, by: -1)
            try await syncCaches()
            try await fixActiveCopiedFlags()
            decompressLock.withLock { decompressedCache = nil }
        }
    }

    /// Deletes a snapshot (QEMU's `qcow2_snapshot_delete`, `qemu-img snapshot -d`): it is
    /// removed from the snapshot table first, then the clusters only it referenced are freed
    /// and the COPIED flags of the active tables are recomputed.
    /// - Parameter idOrName: matched against names first, then ids. (`qemu-img snapshot -d`
    ///   7.2 matches names only; `img snapshot -d` checks that before calling this.)
    /// - Throws: ``BlockError`` `.notFound` ("snapshot not found"); `.readOnly`; `.corrupt`;
    ///   I/O errors.
    public func deleteSnapshot(idOrName: String) async throws {
        try gate.enter(filename, "snapshot delete")
        defer { gate.leave() }
        try checkWritable("snapshot delete")
        try await withDrainedMetadata {
            guard let sn = findSnapshot(id: nil, name: idOrName) ?? findSnapshot(id: idOrName, name: nil) else {
                throw BlockError(.notFound, "snapshot not found", errno: ENOENT, path: filename, operation: "snapshot delete")
            }
            let snL1 = try await readSnapshotL1(sn)
            var list = snapshotList
            list.removeAll { $0.id == sn.id && $0.name == sn.name }
            do {
                try await writeSnapshotTable(list)
            } catch let e as BlockError {
                var e2 = e
                e2.message = "Failed to remove snapshot from snapshot list: " + e.message
                throw e2
            }
            // Unreferenced now: a failure from here on leaks clusters, nothing worse.
            do {
                _ = try await updateTreeRefcounts(snL1, by: -1)
            } catch let e as BlockError {
                var e2 = e
                e2.message = "Failed to free the cluster and L1 table: " + e.message
                throw e2
            }
            let cs = Int64(clusterSize)
            let l1Bytes = Int64(sn.l1Size) * 8
            if l1Bytes > 0 {
                try await freeClusters(at: Int64(sn.l1TableOffset), count: (l1Bytes + cs - 1) / cs, discardHost: passDiscard(.snapshot))
            }
            try await syncCaches()
            try await fixActiveCopiedFlags()
            decompressLock.withLock { decompressedCache = nil }
        }
    }

    /// A read-only node showing the content of a snapshot, for `img convert -l` (QEMU's
    /// `bdrv_snapshot_load_tmp`, without switching this node's tables).
    ///
    /// The reader shares this node's caches and file: keep this node open while using it and
    /// do not delete or apply snapshots meanwhile. Its ``BlockDriver/length`` is the disk size
    /// recorded in the snapshot; areas the snapshot does not map read from this node's backing
    /// file (or as zeros). Closing the reader does not close this node.
    /// - Parameter idOrName: matched against ids first, then names, as `qemu-img convert -l`
    ///   does (`bdrv_snapshot_load_tmp_by_id_or_name`).
    /// - Throws: ``BlockError`` `.notFound` ("Can't find snapshot"); `.corrupt` for an
    ///   invalid snapshot L1 table.
    public func snapshotReader(idOrName: String) async throws -> Qcow2SnapshotReader {
        try await snapshotReader(id: idOrName, name: nil, orName: idOrName)
    }

    /// A read-only view of the snapshot with this id and/or name (both must match when both
    /// are given), as `qemu-img convert -l snapshot.id=...,snapshot.name=...` selects it.
    public func snapshotReader(id: String?, name: String?) async throws -> Qcow2SnapshotReader {
        try await snapshotReader(id: id, name: name, orName: nil)
    }

    func snapshotReader(id: String?, name: String?, orName: String?) async throws -> Qcow2SnapshotReader {
        try gate.enter(filename, "open snapshot")
        defer { gate.leave() }
        await metaLock.lock()
        defer { metaLock.unlock() }
        var found = (id != nil || name != nil) ? findSnapshot(id: id, name: name) : nil
        if found == nil, let orName { found = findSnapshot(id: nil, name: orName) }
        guard let sn = found else {
            throw BlockError(.notFound, "Can't find snapshot", errno: ENOENT, path: filename, operation: "snapshot load")
        }
        let l1 = try await readSnapshotL1(sn)
        return Qcow2SnapshotReader(node: self, snapshot: sn, l1: l1)
    }

    // MARK: Helpers

    /// Takes the metadata lock once no allocating write is in flight, runs `body`, releases.
    private func withDrainedMetadata<R>(_ body: () async throws -> R) async throws -> R {
        await metaLock.lock()
        while let a = inflight.first {
            metaLock.unlock()
            await a.done.wait()
            await metaLock.lock()
        }
        defer { metaLock.unlock() }
        try await l2Cache.flush()
        try await refcountCache.flush()
        try await hostFile.flush()
        return try await body()
    }

    /// QEMU's `find_snapshot_by_id_and_name`: both must match when both are given.
    package func findSnapshot(id: String?, name: String?) -> Qcow2Snapshot? {
        snapshotList.first { s in
            (id == nil || s.id == id!) && (name == nil || s.name == name!) && (id != nil || name != nil)
        }
    }

    /// One more than the largest numeric id (ids that are not numbers count as 0), as
    /// QEMU's `find_new_snapshot_id` (strtoul) picks.
    private func nextSnapshotID() -> String {
        var maxID: UInt64 = 0
        for s in snapshotList {
            let digits = s.id.drop { $0 == " " }.prefix { $0.isASCII && $0.isNumber }
            if let v = UInt64(digits), v > maxID { maxID = v }
        }
        return String(maxID + 1)
    }

    /// The `operation` of the errors of a snapshot L1 table that fails its check (offset or
    /// size): QEMU reports their message on a line of its own, then the failed operation
    /// with the errno (EINVAL, EFBIG); the tools do the same.
    public static let validateSnapshotL1Operation = "validate snapshot L1 table"

    /// Reads a snapshot's L1 table after checking where it lies (QEMU's `qcow2_validate_table`).
    func readSnapshotL1(_ sn: Qcow2Snapshot) async throws -> [UInt64] {
        let n = Int(sn.l1Size)
        if n == 0 { return [] }
        // (Untrusted: an offset past Int64.max is as invalid as one past the end of the file.)
        let off = Int64(exactly: sn.l1TableOffset) ?? -1
        if n > (32 << 20) / 8 {
            throw BlockError(.corrupt, "Snapshot L1 table too large", errno: EFBIG, path: filename, offset: off,
                             operation: Qcow2Node.validateSnapshotL1Operation)
        }
        if off & Int64(clusterSize - 1) != 0 || off <= 0 || off > hostFile.length - Int64(n) * 8 {
            throw BlockError(.corrupt, "Snapshot L1 table offset invalid", errno: EINVAL, path: filename, offset: off,
                             operation: Qcow2Node.validateSnapshotL1Operation)
        }
        let raw = try await hostFile.read(at: off, count: n * 8)
        // SAFETY: `raw` holds `n * 8` bytes (the L1 table read above); the reads stay inside the
        // closure.
        return raw.withUnsafeBytes { b in (0..<n).map { b.be64($0 * 8) } }
    }

    /// Writes a whole L1 table at `offset` and syncs.
    private func writeL1(_ table: [UInt64], at offset: Int64) async throws {
        var raw: [UInt8] = []
        raw.reserveCapacity(table.count * 8)
        for e in table { raw.appendBE64(e) }
        try await hostFile.write(at: offset, bytes: raw)
        try await hostFile.flush()
    }

    private func writeActiveL1(_ table: [UInt64]) async throws {
        try await writeL1(table, at: Int64(header.l1TableOffset))
    }

    /// Writes both caches in dependency order and syncs the file.
    private func syncCaches() async throws {
        try await refcountCache.flush()
        try await l2Cache.flush()
        try await hostFile.flush()
    }

    /// Recomputes the COPIED flags of the active tables from the refcounts (QEMU's
    /// `qcow2_update_snapshot_refcount` with addend 0). The refcounts must be on disk.
    private func fixActiveCopiedFlags() async throws {
        let fixed = try await updateTreeRefcounts(l1Table, by: 0)
        try await l2Cache.flush()
        try await hostFile.flush()
        if fixed != l1Table {
            try await writeActiveL1(fixed)
            l1Table = fixed
        }
    }

    /// Adds `addend` (1, -1 or 0) to the refcount of every L2 table and data cluster reachable
    /// from `l1`, and returns the L1 entries with recomputed COPIED flags (QEMU's
    /// `qcow2_update_snapshot_refcount`). Lock held.
    ///
    /// The COPIED flags of the L2 entries are then set exactly where the count is 1 (with 1
    /// that clears them all), as QEMU does, also in tables of a tree being released that stay
    /// referenced elsewhere. The L2 cache depends on the refcount cache, so a count reaches
    /// the disk before the flag that relies on it. With -1 the caller must have dropped the
    /// reference to `l1` (and synced) first. L2 tables whose count drops to zero leave the
    /// cache; freed clusters are discarded in the host file, as QEMU does for snapshot
    /// operations by default. The returned L1 is meaningful for addends 1 and 0.
    @discardableResult
    func updateTreeRefcounts(_ l1: [UInt64], by addend: Int64) async throws -> [UInt64] {
        let cs = Int64(clusterSize)
        let fileEnd = max(hostFile.length, endCluster * cs)
        var out = l1
        for (i, l1e) in l1.enumerated() {
            let l2 = Int64(l1e & Qcow2Node.l1OffsetMask)
            if l2 == 0 { continue }
            if l2 & (cs - 1) != 0 || l2 >= fileEnd {
                throw await signalCorruption("L2 table offset 0x\(String(l2, radix: 16)) invalid (L1 index: 0x\(String(i, radix: 16)))", offset: l2)
            }
            let table = try await l2Cache.get(l2)
            l2Cache.pin(table)
            do {
                for j in 0..<l2Entries {
                    let entry = table.bytes.be64(j * 8)
                    var refcount: UInt64 = 0
                    switch kind(of: entry) {
                    case .compressed:
                        if addend != 0 {
                            let (off, size) = compressedLocation(entry)
                            for c in (off >> Int64(clusterBits))...((off + Int64(size) - 1) >> Int64(clusterBits)) {
                                try await addSnapshotReference(c, addend)
                            }
                        }
                        refcount = 2 // compressed clusters are never written in place
                    case .normal, .zeroAllocated:
                        let off = Int64(entry & Qcow2Node.l2OffsetMask)
                        if off & (cs - 1) != 0 {
                            throw await signalCorruption("Cluster allocation offset 0x\(String(off, radix: 16)) unaligned (L2 offset: 0x\(String(l2, radix: 16)), L2 index: 0x\(String(j, radix: 16)))", offset: off)
                        }
                        if addend != 0 {
                            try await addSnapshotReference(off >> Int64(clusterBits), addend)
                        }
                        refcount = try await self.refcount(of: off >> Int64(clusterBits))
                    case .zero, .unallocated:
                        refcount = 0
                    }
                    let newEntry = refcount == 1 ? entry | Qcow2Node.copied : entry & ~Qcow2Node.copied
                    if newEntry != entry {
                        // The count the flag stands for reaches the disk before the flag.
                        try await l2Cache.setDependency(on: refcountCache)
                        table.bytes.setBE64(j * 8, newEntry)
                        l2Cache.markDirty(table)
                    }
                }
            } catch {
                l2Cache.release(table)
                throw error
            }
            l2Cache.release(table)
            let l2Cluster = l2 >> Int64(clusterBits)
            if addend != 0 {
                try await addSnapshotReference(l2Cluster, addend)
            }
            if addend < 0 {
                if try await refcount(of: l2Cluster) == 0 { l2Cache.discard(l2) }
                continue
            }
            let r = try await refcount(of: l2Cluster)
            out[i] = r == 1 ? (l1e & Qcow2Node.l1OffsetMask) | Qcow2Node.copied : l1e & Qcow2Node.l1OffsetMask
        }
        return out
    }

    /// Adds `addend` to one cluster's refcount; freed clusters are discarded in the host file.
    /// - Throws: `.invalidArgument` (EINVAL, as QEMU reports it) when the count would overflow
    ///   the image's refcount width (e.g. `refcount_bits=1` cannot share clusters).
    private func addSnapshotReference(_ cluster: Int64, _ addend: Int64) async throws {
        if addend > 0, try await refcount(of: cluster) > maxRefcount - UInt64(addend) {
            throw BlockError(.invalidArgument, "Refcount overflow for cluster \(cluster) (refcount width \(header.refcountBits) bits)",
                             errno: EINVAL, path: filename, offset: cluster << Int64(clusterBits))
        }
        try await updateRefcount(cluster, by: addend, discardHost: addend < 0 && passDiscard(.snapshot))
    }
}

/// A read-only view of one internal snapshot of a qcow2 image (see
/// ``Qcow2Node/snapshotReader(idOrName:)``). Reads go through the image's caches with the
/// snapshot's L1 table; writes are refused. Once the view or its image is closed, every call
/// throws ``BlockError`` with code `.closed`.
// @unchecked Sendable: every stored property is immutable or thread-safe itself.
public final class Qcow2SnapshotReader: BlockDriver, @unchecked Sendable {
    /// The image the snapshot belongs to.
    public let node: Qcow2Node
    /// The snapshot shown.
    public let snapshot: Qcow2Snapshot
    let l1: [UInt64]
    private let gate = CloseGate()

    init(node: Qcow2Node, snapshot: Qcow2Snapshot, l1: [UInt64]) {
        self.node = node
        self.snapshot = snapshot
        self.l1 = l1
    }

    /// `qcow2`, the driver of the image the snapshot belongs to.
    public var driverName: String { "qcow2" }
    /// The image's file name.
    public var filename: String { node.filename }
    /// The disk size recorded in the snapshot.
    public var length: Int64 { Int64(snapshot.diskSize) }
    /// Always `true`: snapshot views cannot be written.
    public var isReadOnly: Bool { true }
    /// 1: reads may start at any byte.
    public var requestAlignment: Int { 1 }
    /// The image's file.
    public var file: (any BlockDriver)? { node.hostFile }
    /// The image's backing node (unallocated clusters of the snapshot read from it).
    public var backing: (any BlockDriver)? { node.backing }

    /// Admits a request into this view and into its image (which refuses it once closed).
    private func run<R>(_ op: String, _ body: () async throws -> R) async throws -> R {
        try await gate.run(filename, op) { try await node.gate.run(filename, op, body) }
    }

    /// Reads `buffer.count` bytes at `offset` as the disk was when the snapshot was taken,
    /// through the snapshot's L1 table.
    /// - Throws: ``BlockError`` `.closed` after ``close()`` of the view or of its image, or an I/O error.
    public func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws {
        try await run("read") {
            var done = 0
            while done < buffer.count {
                let pos = offset + Int64(done)
                let m = try await node.metaLock.withLock { try await node.lookup(pos, Int64(buffer.count - done), in: l1) }
                let n = Int(m.length)
                try await node.readMapped(m, guestOffset: pos, into: UnsafeMutableRawBufferPointer(rebasing: buffer[done..<(done + n)]))
                done += n
            }
        }
    }

    private func refuse(_ op: String) throws -> BlockError {
        try gate.check(filename, op)
        try node.gate.check(filename, op)
        return BlockError(.readOnly, "Permission denied: snapshot views are read-only", errno: EPERM, path: filename, operation: op)
    }

    /// Always fails: snapshot views are read-only.
    /// - Throws: ``BlockError`` `.readOnly` (or `.closed`).
    public func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags) async throws { throw try refuse("write") }
    /// Always fails: snapshot views are read-only.
    /// - Throws: ``BlockError`` `.readOnly` (or `.closed`).
    public func writeZeroes(at offset: Int64, length: Int64, flags: WriteFlags) async throws { throw try refuse("write zeroes") }
    /// Always fails: snapshot views are read-only.
    /// - Throws: ``BlockError`` `.readOnly` (or `.closed`).
    public func discard(at offset: Int64, length: Int64) async throws { throw try refuse("discard") }
    /// Always fails: snapshot views are read-only.
    /// - Throws: ``BlockError`` `.readOnly` (or `.closed`).
    public func truncate(to length: Int64, preallocation: Preallocation) async throws { throw try refuse("truncate") }
    /// Nothing to write back: the view never changes anything.
    public func flush() async throws {
        try gate.check(filename, "flush")
        try node.gate.check(filename, "flush")
    }
    /// The view holds nothing of its own: closing it waits for its requests; the image node
    /// stays open (close it separately).
    public func close() async throws {
        guard await gate.beginClose() else { return }
        await gate.drain()
        gate.finishClose()
    }

    /// The allocation status at `offset` in the snapshot's L1 table.
    /// - Throws: ``BlockError`` `.closed` after ``close()``, or an I/O error.
    public func blockStatus(at offset: Int64, length: Int64) async throws -> BlockStatus {
        try await run("block status") {
            let m = try await node.metaLock.withLock { try await node.lookup(offset, length, in: l1) }
            return node.status(of: m, at: offset)
        }
    }
}
