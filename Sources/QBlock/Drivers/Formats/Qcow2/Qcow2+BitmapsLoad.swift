import QBlockBitmaps
import QBlockCore
/// Persistent bitmaps of a qcow2 node: loading the directory at open, marking the bitmaps
/// in use before the first write, and the public view of them (QEMU's
/// `qcow2_load_dirty_bitmaps`). Storing is in `Qcow2+BitmapsStore.swift`.
extension Qcow2Node {
    /// The bitmaps listed in the image's bitmap directory, with the flags as they are on
    /// disk (what `qemu-img info` prints).
    public var persistentBitmapInfo: [Qcow2BitmapInfo] { bitmapDirectory.map(\.info) }

    /// The bitmaps extension when it is valid (autoclear bit 0 set), else nil.
    func validBitmapsExtension() throws -> Qcow2BitmapsExtension? {
        guard header.autoclearFeatures & Qcow2Header.autoclearBitmaps != 0,
              let d = header.bitmapsExtensionData() else { return nil }
        return try Qcow2BitmapsExtension.parse(d, clusterSize: clusterSize)
    }

    /// Reads and validates the bitmap directory the extension points to.
    func readBitmapDirectory(_ ext: Qcow2BitmapsExtension) async throws -> [Qcow2BitmapEntry] {
        guard ext.directorySize > 0 else {
            throw BlockError(.corrupt, "Requested bitmap directory size is zero", path: filename, operation: "read bitmap directory")
        }
        // (Compared without adding: a hostile offset would overflow.)
        let fileLength = UInt64(max(hostFile.length, 0))
        guard ext.directoryOffset <= fileLength, ext.directorySize <= fileLength - ext.directoryOffset else {
            throw BlockError(.corrupt, "Broken bitmap directory", path: filename, offset: Int64(ext.directoryOffset),
                             operation: "read bitmap directory")
        }
        let dir = try await hostFile.read(at: Int64(ext.directoryOffset), count: Int(ext.directorySize))
        return try Qcow2BitmapEntry.parseDirectory(dir, count: ext.count, diskSize: Int64(header.size), clusterSize: clusterSize)
    }

    /// At open: reads the directory into ``persistentBitmaps``. A bitmap marked in use
    /// (or with extra data not marked compatible) is loaded without its bits and flagged
    /// ``DirtyBitmap/isInconsistent``; a bitmap without the `auto` flag is disabled.
    func loadPersistentBitmaps() async throws {
        guard let ext = try validBitmapsExtension() else { return }
        let list = try await readBitmapDirectory(ext)
        for e in list {
            let b = try DirtyBitmap(name: e.nameString, size: Int64(header.size), granularity: e.granularity)
            b.isPersistent = true
            if e.flags.contains(.inUse) || !e.usable {
                b.isInconsistent = true
            } else {
                try await loadBitmapData(e, into: b)
            }
            if !e.flags.contains(.auto) { b.isEnabled = false }
            try persistentBitmaps.add(b)
        }
        bitmapDirectory = list
    }

    /// Reads the bitmap table of `e`, validating every entry.
    func readBitmapTable(_ e: Qcow2BitmapEntry) async throws -> [UInt64] {
        let bytes = Int(e.tableSize) * 8
        func bad() -> BlockError {
            BlockError(.corrupt, "Could not read bitmap_table table from image for bitmap '\(e.nameString)': Invalid argument",
                       path: filename, offset: Int64(e.tableOffset), operation: "read bitmap table")
        }
        let fileLength = UInt64(max(hostFile.length, 0))
        guard e.tableOffset <= fileLength, UInt64(bytes) <= fileLength - e.tableOffset else { throw bad() }
        let raw = try await hostFile.read(at: Int64(e.tableOffset), count: bytes)
        var table = [UInt64](repeating: 0, count: Int(e.tableSize))
        for i in table.indices {
            table[i] = raw.be64(i * 8)
            guard Qcow2BitmapEntry.tableEntryValid(table[i], clusterSize: clusterSize) else { throw bad() }
        }
        return table
    }

    /// Loads the bits of `e` into `b` (QEMU's `load_bitmap_data`).
    private func loadBitmapData(_ e: Qcow2BitmapEntry, into b: DirtyBitmap) async throws {
        let table = try await readBitmapTable(e)
        let cs = clusterSize
        let expected = Qcow2BitmapEntry.tableSize(diskSize: Int64(header.size), granularity: e.granularity, clusterSize: cs)
        guard expected == Int64(e.tableSize) else {
            throw BlockError(.corrupt, "Could not read bitmap '\(e.nameString)' from image: Invalid argument",
                             path: filename, operation: "read bitmap")
        }
        let perCluster = Int64(cs) * 8
        for (i, entry) in table.enumerated() {
            let first = Int64(i) * perCluster
            let off = entry & Qcow2BitmapEntry.tableOffsetMask
            if off == 0 {
                if entry & Qcow2BitmapEntry.tableAllOnes != 0 {
                    b.mark(offset: first * e.granularity, length: perCluster * e.granularity, force: true)
                }
                continue
            }
            guard off <= UInt64(max(hostFile.length, 0)), UInt64(cs) <= UInt64(max(hostFile.length, 0)) - off else {
                throw BlockError(.corrupt, "Could not read bitmap '\(e.nameString)' from image: Invalid argument",
                                 path: filename, offset: Int64(off), operation: "read bitmap")
            }
            let data = try await hostFile.read(at: Int64(off), count: cs)
            // SAFETY: `data` is one cluster and `perCluster` chunks are exactly one cluster of bits.
            data.withUnsafeBytes { b.deserialize(firstChunk: first, count: perCluster, from: $0) }
        }
    }

    /// Sets the in_use flag of every usable bitmap on disk, rewriting the directory in place
    /// with the autoclear bit dropped meanwhile (QEMU's `update_ext_header_and_dir_in_place`):
    /// a crash in between leaves either the old state or no valid bitmaps, never a
    /// half-written directory that is trusted. Lock held (or the node not yet shared).
    func markBitmapsInUseLocked() async throws {
        var list = bitmapDirectory
        var changed = false
        for i in list.indices where list[i].usable && !list[i].flags.contains(.inUse) {
            list[i].flags.insert(.inUse)
            changed = true
        }
        guard changed, let ext = try validBitmapsExtension() else { return }
        let dir = Qcow2BitmapEntry.encodeDirectory(list)
        guard UInt64(dir.count) == ext.directorySize else {
            throw BlockError(.corrupt, "Can't update bitmap directory: Invalid argument", path: filename,
                             operation: "update bitmap directory")
        }
        header.autoclearFeatures &= ~Qcow2Header.autoclearBitmaps
        try await writeHeader()
        try await hostFile.flush()
        try await hostFile.write(at: Int64(ext.directoryOffset), bytes: dir)
        try await hostFile.flush()
        header.autoclearFeatures |= Qcow2Header.autoclearBitmaps
        try await writeHeader()
        try await hostFile.flush()
        bitmapDirectory = list
    }

    /// Called after every write, write-zeroes and discard (whether it succeeded or not, as
    /// QEMU's `bdrv_co_write_req_finish`): marks the enabled persistent bitmaps.
    @inline(__always)
    func markBitmaps(_ offset: Int64, _ length: Int64) {
        persistentBitmaps.mark(offset: offset, length: length)
    }
}
