#if canImport(Glibc)
import Glibc
#endif
import QBlockCore
import QBlockGraph

/// One internal snapshot of a qcow2 image: an entry of the snapshot table.
///
/// The table (QEMU's `docs/interop/qcow2.txt`, "Snapshots") starts at the cluster-aligned
/// header field `snapshots_offset` and holds `nb_snapshots` entries, each aligned to 8 bytes:
///
/// ```
///  0  l1_table_offset u64     8  l1_size u32        12 id_str_size u16   14 name_size u16
///  16 date_sec u32            20 date_nsec u32      24 vm_clock_nsec u64
///  32 vm_state_size u32       36 extra_data_size u32
///  40 extra data:  vm_state_size_large u64, disk_size u64, icount u64 (QEMU 7.2 writes all three;
///                  v3 images must have at least the first two), then data unknown to us (kept)
///     id string, name string (not NUL-terminated), padding to the next multiple of 8
/// ```
///
/// Each snapshot has its own L1 table, a copy of the active one at the time it was taken;
/// the L2 tables and data clusters it reaches are shared with the active image and counted
/// once per table that references them, which is what makes writes after a snapshot copy
/// them first (the COPIED flag is clear when a refcount is above one).
public struct Qcow2Snapshot: Sendable, Equatable {
    /// The unique id: "1", "2", ... as QEMU numbers them.
    public var id: String
    /// The name (tag); not necessarily unique.
    public var name: String
    /// When the snapshot was taken: seconds since the epoch.
    public var dateSeconds: UInt32
    /// When the snapshot was taken: the nanoseconds part.
    public var dateNanoseconds: UInt32
    /// The guest's virtual clock when the snapshot was taken, in nanoseconds.
    public var vmClockNanoseconds: UInt64
    /// The size of the saved VM state (0 for a disk-only snapshot).
    public var vmStateSize: UInt64
    /// The virtual disk size when the snapshot was taken.
    public var diskSize: UInt64
    /// The instruction count of record/replay, or nil when the entry has none (QEMU's -1).
    public var icount: UInt64?
    /// Host offset of the snapshot's L1 table.
    public internal(set) var l1TableOffset: UInt64
    /// Entries of the snapshot's L1 table.
    public internal(set) var l1Size: UInt32
    /// Extra data after the fields this implementation knows, kept as it was.
    var unknownExtraData: [UInt8] = []

    init(id: String, name: String, dateSeconds: UInt32, dateNanoseconds: UInt32, vmClockNanoseconds: UInt64,
         vmStateSize: UInt64, diskSize: UInt64, icount: UInt64?, l1TableOffset: UInt64, l1Size: UInt32) {
        self.id = id
        self.name = name
        self.dateSeconds = dateSeconds
        self.dateNanoseconds = dateNanoseconds
        self.vmClockNanoseconds = vmClockNanoseconds
        self.vmStateSize = vmStateSize
        self.diskSize = diskSize
        self.icount = icount
        self.l1TableOffset = l1TableOffset
        self.l1Size = l1Size
    }

    static let fixedSize = 40
    /// Size of the extra data QEMU 7.2 writes (vm_state_size_large, disk_size, icount).
    static let knownExtraSize = 24
    /// QEMU's limits: `QCOW_MAX_SNAPSHOT_EXTRA_DATA`, `QCOW_MAX_SNAPSHOTS_SIZE`, `QCOW_MAX_SNAPSHOTS`.
    static let maxExtraData = 1024
    static let maxTableSize = 64 << 20
    static let maxCount = 65536

    /// The bytes of this entry as QEMU 7.2 writes it (unpadded).
    func encoded() -> [UInt8] {
        var b: [UInt8] = []
        let idBytes = Array(id.utf8), nameBytes = Array(name.utf8)
        b.appendBE64(l1TableOffset)
        b.appendBE32(l1Size)
        b.appendBE16(UInt16(idBytes.count))
        b.appendBE16(UInt16(nameBytes.count))
        b.appendBE32(dateSeconds)
        b.appendBE32(dateNanoseconds)
        b.appendBE64(vmClockNanoseconds)
        // A VM state too large for 32 bits is recorded as 0 here, so that older readers
        // treat the snapshot as disk-only rather than truncate the state.
        b.appendBE32(vmStateSize <= UInt64(UInt32.max) ? UInt32(vmStateSize) : 0)
        b.appendBE32(UInt32(Qcow2Snapshot.knownExtraSize + unknownExtraData.count))
        b.appendBE64(vmStateSize)
        b.appendBE64(diskSize)
        b.appendBE64(icount ?? UInt64.max)
        b.append(contentsOf: unknownExtraData)
        b.append(contentsOf: idBytes)
        b.append(contentsOf: nameBytes)
        return b
    }

    /// The whole table for `snapshots`: entries padded to 8 bytes, the last one unpadded
    /// (its length is what QEMU allocates and records as the table size).
    static func encodeTable(_ snapshots: [Qcow2Snapshot]) -> [UInt8] {
        var out: [UInt8] = []
        for s in snapshots {
            out.append(contentsOf: [UInt8](repeating: 0, count: (8 - out.count % 8) % 8))
            out.append(contentsOf: s.encoded())
        }
        return out
    }

    /// The format-independent description (`qemu-img snapshot -l`, QAPI's `SnapshotInfo`).
    public var info: SnapshotInfo {
        SnapshotInfo(id: id, name: name, dateSeconds: dateSeconds, dateNanoseconds: dateNanoseconds,
                     vmClockNanoseconds: vmClockNanoseconds, vmStateSize: vmStateSize, icount: icount)
    }
}

extension Qcow2Node {
    /// Reads and validates the snapshot table (QEMU's `qcow2_read_snapshots`) into
    /// ``snapshotList``. Called at open.
    /// - Throws: `.corrupt` for a table that lies outside the file or exceeds QEMU's limits.
    func loadSnapshotTable() async throws {
        snapshotList = []
        snapshotTableSize = 0
        let count = Int(header.nbSnapshots)
        guard count > 0 else { return }
        // (The header's check keeps the table's offset and entry count within QEMU's limits;
        // an offset of 0 would read the header as the table.)
        let start = Int64(exactly: header.snapshotsOffset) ?? -1
        let fileLength = hostFile.length
        func corrupt(_ m: String, errno: Int32 = EINVAL) -> BlockError {
            BlockError(.corrupt, m, errno: errno, path: filename, offset: start, operation: "read snapshot table")
        }
        if start <= 0 || start % Int64(clusterSize) != 0 {
            throw corrupt("Snapshot table offset invalid")
        }
        // Read the table in chunks as far as it goes; what lies past the end of the file
        // reads as zeroes, as QEMU's reads do.
        var bytes: [UInt8] = []
        func need(_ end: Int) async throws {
            if end <= bytes.count { return }
            let want = max(end, bytes.count + 65536)
            let from = start + Int64(bytes.count)
            let inFile = max(0, min(Int64(want - bytes.count), fileLength - from))
            if inFile > 0 { bytes.append(contentsOf: try await hostFile.read(at: from, count: Int(inFile))) }
            if bytes.count < want { bytes.append(contentsOf: [UInt8](repeating: 0, count: want - bytes.count)) }
        }
        var list: [Qcow2Snapshot] = []
        var off = 0
        for _ in 0..<count {
            off = (off + 7) & ~7
            try await need(off + Qcow2Snapshot.fixedSize)
            // SAFETY: `need(off + fixedSize)` above made `bytes` hold the whole fixed header, so every
            // read at `off + k` (k < 40) is in bounds.
            let (l1Offset, l1Size, idLen, nameLen, dateSec, dateNsec, clock, vmState32, extraLen) = bytes.withUnsafeBytes { b in
                (b.be64(off), b.be32(off + 8), Int(b.be16(off + 12)), Int(b.be16(off + 14)), b.be32(off + 16),
                 b.be32(off + 20), b.be64(off + 24), b.be32(off + 32), Int(b.be32(off + 36)))
            }
            off += Qcow2Snapshot.fixedSize
            if extraLen > Qcow2Snapshot.maxExtraData {
                throw corrupt("Too much extra metadata in snapshot table entry \(list.count)", errno: EFBIG)
            }
            try await need(off + extraLen + idLen + nameLen)
            var s = Qcow2Snapshot(id: "", name: "", dateSeconds: dateSec, dateNanoseconds: dateNsec,
                                  vmClockNanoseconds: clock, vmStateSize: UInt64(vmState32), diskSize: header.size,
                                  icount: nil, l1TableOffset: l1Offset, l1Size: l1Size)
            if extraLen >= 8 { s.vmStateSize = bytes.be64(off) }
            if extraLen >= 16 { s.diskSize = bytes.be64(off + 8) }
            if extraLen >= 24 {
                let ic = bytes.be64(off + 16)
                s.icount = ic == UInt64.max ? nil : ic
            }
            if extraLen > Qcow2Snapshot.knownExtraSize {
                s.unknownExtraData = Array(bytes[(off + Qcow2Snapshot.knownExtraSize)..<(off + extraLen)])
            }
            off += extraLen
            s.id = String(decoding: bytes[off..<(off + idLen)], as: UTF8.self)
            off += idLen
            s.name = String(decoding: bytes[off..<(off + nameLen)], as: UTF8.self)
            off += nameLen
            if off > Qcow2Snapshot.maxTableSize { throw corrupt("Snapshot table is too big", errno: EFBIG) }
            list.append(s)
        }
        snapshotList = list
        snapshotTableSize = off
    }

    /// Writes `list` as a new snapshot table in newly allocated clusters, switches the header
    /// to it (`nb_snapshots` and `snapshots_offset`, adjacent fields, in one write) and frees
    /// the old table (QEMU's `qcow2_write_snapshots`). Lock held.
    ///
    /// Order: the new table and its refcounts reach the disk before the header points to it;
    /// the old table is freed only afterwards. A crash leaves at worst the new clusters leaked.
    func writeSnapshotTable(_ list: [Qcow2Snapshot]) async throws {
        let bytes = Qcow2Snapshot.encodeTable(list)
        if bytes.count > Qcow2Snapshot.maxTableSize {
            throw BlockError(.noSpace, "Snapshot table too large", errno: EFBIG, path: filename, operation: "write snapshot table")
        }
        let cs = Int64(clusterSize)
        var newOffset: Int64 = 0
        if !list.isEmpty {
            newOffset = try await allocateClusters((Int64(bytes.count) + cs - 1) / cs)
        }
        do {
            if newOffset != 0 {
                try await refcountCache.flush()
                try await hostFile.flush()
                try await hostFile.write(at: newOffset, bytes: bytes)
                try await hostFile.flush()
            }
            var fields: [UInt8] = []
            fields.appendBE32(UInt32(list.count))
            fields.appendBE64(UInt64(newOffset))
            try await hostFile.write(at: 60, bytes: fields)
            try await hostFile.flush()
        } catch {
            if newOffset != 0 {
                try? await freeClusters(at: newOffset, count: (Int64(bytes.count) + cs - 1) / cs, discardHost: true)
            }
            throw error
        }
        let oldOffset = Int64(header.snapshotsOffset)
        let oldSize = Int64(snapshotTableSize)
        header.nbSnapshots = UInt32(list.count)
        header.snapshotsOffset = UInt64(newOffset)
        snapshotList = list
        snapshotTableSize = bytes.count
        if oldOffset != 0 && oldSize > 0 {
            let first = oldOffset / cs
            let last = (oldOffset + oldSize - 1) / cs
            try await freeClusters(at: oldOffset, count: last - first + 1, discardHost: true)
        }
    }
}
