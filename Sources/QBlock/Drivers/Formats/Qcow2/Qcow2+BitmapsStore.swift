import QBlockBitmaps
import QBlockCore
/// Persistent bitmaps of a qcow2 node: adding, removing and storing them (QEMU's
/// `qcow2_co_can_store_new_dirty_bitmap`, `qcow2_co_remove_persistent_dirty_bitmap`,
/// `qcow2_store_persistent_dirty_bitmaps`).
///
/// Storing writes the bits of every persistent, consistent bitmap into new data clusters
/// (all-zero clusters become zero table entries), a new bitmap table per bitmap, and a new
/// directory; the caches and the file are flushed before the header is switched to the new
/// directory (one header write, then `fdatasync`), and only then are the old directory and
/// tables freed. A crash at any point leaves either the old bitmaps (in use, so not
/// trusted) or the new ones, and at worst leaked clusters.
extension Qcow2Node {
    /// Adds a persistent bitmap, stored in the image when the node is closed (or at
    /// ``storePersistentBitmaps()``), as QMP's `block-dirty-bitmap-add` with
    /// `persistent: true` does.
    /// - Parameters:
    ///   - name: the bitmap's name, unique on the node, at most 1023 bytes.
    ///   - granularity: bytes per bit, a power of two from 512 to 2 GiB; nil: QEMU's default
    ///     (the cluster size, within 4 KiB ... 64 KiB).
    ///   - disabled: create it disabled (writes do not mark it).
    ///   - nodeName: the node's name in error messages (QEMU's `bdrv_get_device_or_node_name`).
    /// - Returns: the new bitmap, already attached to ``persistentBitmaps``.
    /// - Throws: ``BlockError`` with QEMU's messages: empty name, bad granularity, a name
    ///   already taken, qcow2 v2, size or count limits.
    @discardableResult
    public func addPersistentBitmap(name: String, granularity: Int64? = nil, disabled: Bool = false,
                                    nodeName: String? = nil) throws -> DirtyBitmap {
        try gate.enter(filename, "add bitmap")
        defer { gate.leave() }
        func fail(_ m: String) -> BlockError { BlockError(.invalidArgument, m, path: filename, operation: "add bitmap") }
        guard !name.isEmpty else { throw fail("Bitmap name cannot be empty") }
        try checkWritable("add bitmap")
        if let g = granularity, g < 512 || g & (g - 1) != 0 || g > Int64(UInt32.max) {
            throw fail("Granularity must be power of 2 and at least 512")
        }
        let g = granularity ?? Int64(min(65536, max(4096, clusterSize)))
        if persistentBitmaps.named(name) != nil { throw fail("Bitmap already exists: \(name)") }
        let prefix = "Can't make bitmap '\(name)' persistent in '\(nodeName ?? filename)': "
        if header.version < 3 { throw fail(prefix + "Cannot store dirty bitmaps in qcow2 v2 files") }
        if let m = Self.bitmapConstraintError(name: name, granularity: g, diskSize: Int64(header.size), clusterSize: clusterSize) {
            throw fail(prefix + m)
        }
        let persistent = persistentBitmaps.all.filter(\.isPersistent)
        if persistent.count + 1 > Int(Qcow2BitmapsExtension.maxBitmaps) {
            throw fail(prefix + "Maximum number of persistent bitmaps is already reached")
        }
        let dirSize = (persistent.map(\.name) + [name]).reduce(0) { $0 + ((24 + $1.utf8.count + 7) & ~7) }
        if UInt64(dirSize) > Qcow2BitmapsExtension.maxDirectorySize {
            throw fail(prefix + "Not enough space in the bitmap directory")
        }
        let b = try DirtyBitmap(name: name, size: Int64(header.size), granularity: g)
        b.isPersistent = true
        b.isEnabled = !disabled
        try persistentBitmaps.add(b)
        return b
    }

    /// QEMU's `check_constraints_on_bitmap`: the message, or nil when the bitmap may be stored.
    static func bitmapConstraintError(name: String, granularity: Int64, diskSize: Int64, clusterSize: Int) -> String? {
        let bits = granularity.trailingZeroBitCount
        if bits > Int(Qcow2BitmapEntry.maxGranularityBits) { return "Granularity exceeds maximum (2147483648 bytes)" }
        if bits < Int(Qcow2BitmapEntry.minGranularityBits) { return "Granularity is under minimum (512 bytes)" }
        let bytes = ((diskSize + granularity - 1) / granularity + 7) / 8
        if UInt64(bytes) > Qcow2BitmapEntry.maxPhysSize || UInt64(bytes) > UInt64(Qcow2BitmapEntry.maxTableSize) * UInt64(clusterSize) {
            return "Too much space will be occupied by the bitmap. Use larger granularity"
        }
        if name.utf8.count > Qcow2BitmapEntry.maxNameSize { return "Name length exceeds maximum (1023 characters)" }
        return nil
    }

    /// Removes the persistent bitmap `name` from the node and at once from the image
    /// (QMP's `block-dirty-bitmap-remove`): a new directory without it, then its clusters
    /// are freed. An inconsistent bitmap may be removed; a busy one may not.
    /// - Throws: `.notFound` "Dirty bitmap 'NAME' not found", `.busy`, or I/O errors.
    public func removePersistentBitmap(named name: String) async throws {
        try gate.enter(filename, "remove bitmap")
        defer { gate.leave() }
        guard let b = persistentBitmaps.named(name) else {
            throw BlockError(.notFound, "Dirty bitmap '\(name)' not found", path: filename, operation: "remove bitmap")
        }
        if b.isBusy, let e = b.useError() { throw e }
        let nameBytes = Array(name.utf8)
        if bitmapDirectory.contains(where: { $0.name == nameBytes }) {
            try checkWritable("remove bitmap")
            try await metaLock.withLock {
                var list = bitmapDirectory
                guard let i = list.firstIndex(where: { $0.name == nameBytes }) else { return }
                let e = list.remove(at: i)
                try await replaceBitmapDirectory(with: list)
                // Like QEMU, a failure to free the old clusters only leaks them.
                try? await freeBitmapClusters(e)
            }
        }
        persistentBitmaps.remove(b)
    }

    /// Writes every persistent, consistent bitmap into the image now (``close()`` does
    /// the same and leaves them consistent on disk). As the node stays open read-write, the
    /// stored bitmaps are marked in use again at once: only a clean close makes them
    /// trustworthy after a crash, as in QEMU, since writes and bitmap operations go on.
    /// - Throws: constraint errors with QEMU's messages, I/O errors (the image then keeps
    ///   its previous bitmaps).
    public func storePersistentBitmaps() async throws {
        try gate.enter(filename, "store bitmaps")
        defer { gate.leave() }
        try await metaLock.withLock {
            try await storeBitmapsLocked()
            if !isReadOnly { try await markBitmapsInUseLocked() }
        }
    }

    /// Stores the bitmaps and clears their in_use flags. Nothing to do on a read-only node
    /// (its bitmaps are read-only, as QEMU's). Lock held.
    func storeBitmapsLocked() async throws {
        guard !isReadOnly else { return }
        var list = bitmapDirectory
        var dropped: [Qcow2BitmapEntry] = []
        var pending: [(index: Int, bitmap: DirtyBitmap)] = []
        let diskSize = Int64(header.size)
        // QEMU keeps a node's bitmaps newest first, so new bitmaps are appended to the
        // directory in that order.
        for b in persistentBitmaps.all.reversed() where b.isPersistent && !b.isInconsistent {
            if let m = Self.bitmapConstraintError(name: b.name, granularity: b.granularity, diskSize: diskSize,
                                                  clusterSize: clusterSize) {
                throw BlockError(.invalidArgument, "Bitmap '\(b.name)' doesn't satisfy the constraints: \(m)", path: filename,
                                 operation: "store bitmaps")
            }
            let nameBytes = Array(b.name.utf8)
            let flags: Qcow2BitmapFlags = b.isEnabled ? .auto : []
            let bits = UInt8(b.granularity.trailingZeroBitCount)
            if let i = list.firstIndex(where: { $0.name == nameBytes }) {
                guard list[i].flags.contains(.inUse) else {
                    throw BlockError(.invalidArgument, "Bitmap '\(b.name)' already exists in the image", path: filename,
                                     operation: "store bitmaps")
                }
                dropped.append(list[i])
                list[i].tableOffset = 0
                list[i].tableSize = 0
                list[i].flags = flags.union(list[i].flags.intersection(.extraDataCompatible))
                list[i].granularityBits = bits
                pending.append((i, b))
            } else {
                guard list.count < Int(Qcow2BitmapsExtension.maxBitmaps) else {
                    throw BlockError(.invalidArgument, "Too many persistent bitmaps", path: filename, operation: "store bitmaps")
                }
                list.append(Qcow2BitmapEntry(flags: flags, granularityBits: bits, name: nameBytes))
                pending.append((list.count - 1, b))
            }
        }
        guard !pending.isEmpty else { return }
        var written: [Qcow2BitmapEntry] = []
        do {
            // Written in directory order, as QEMU does (so clusters are laid out alike).
            for p in pending.sorted(by: { $0.index < $1.index }) {
                let (offset, size) = try await writeBitmap(p.bitmap)
                list[p.index].tableOffset = offset
                list[p.index].tableSize = size
                written.append(list[p.index])
            }
            try await replaceBitmapDirectory(with: list)
        } catch {
            for e in written { try? await freeBitmapClusters(e) }
            throw error
        }
        for e in dropped { try? await freeBitmapClusters(e) }
    }

    /// Writes the data clusters and the table of `b`; returns the table's offset and size.
    private func writeBitmap(_ b: DirtyBitmap) async throws -> (UInt64, UInt32) {
        let cs = clusterSize
        let tableSize = Qcow2BitmapEntry.tableSize(diskSize: b.size, granularity: b.granularity, clusterSize: cs)
        guard tableSize <= Int64(Qcow2BitmapEntry.maxTableSize), UInt64(tableSize) * UInt64(cs) <= Qcow2BitmapEntry.maxPhysSize else {
            throw BlockError(.invalidArgument, "Bitmap '\(b.name)' is too big", path: filename, operation: "store bitmaps")
        }
        var table = [UInt64](repeating: 0, count: Int(tableSize))
        let perCluster = Int64(cs) * 8
        let chunks = b.chunkCount
        var buf = [UInt8](repeating: 0, count: cs)
        do {
            for i in table.indices {
                let first = Int64(i) * perCluster
                let n = min(perCluster, chunks - first)
                guard n > 0, b.anyDirty(firstChunk: first, count: n) else { continue }
                for k in buf.indices { buf[k] = 0 }
                // SAFETY: `buf` is one cluster and `serialize` writes `n` chunks, at most one cluster's
                // worth of bits.
                buf.withUnsafeMutableBytes { b.serialize(firstChunk: first, count: n, into: $0) }
                let off = try await allocateClusters(1)
                table[i] = UInt64(off)
                try await hostFile.write(at: off, bytes: buf)
            }
            let tableClusters = (tableSize * 8 + Int64(cs) - 1) / Int64(cs)
            var raw = [UInt8]()
            raw.reserveCapacity(Int(tableClusters) * cs)
            for e in table { raw.appendBE64(e) }
            let off = try await allocateClusters(tableClusters)
            try await hostFile.write(at: off, bytes: raw)
            return (UInt64(off), UInt32(tableSize))
        } catch {
            for e in table where e != 0 { try? await freeClusters(at: Int64(e), count: 1, discardHost: true) }
            throw error
        }
    }

    /// Writes `list` as a new directory and switches the header to it (or removes the
    /// extension and clears autoclear bit 0 when `list` is empty), then frees the old
    /// directory. Lock held.
    func replaceBitmapDirectory(with list: [Qcow2BitmapEntry]) async throws {
        let old = try validBitmapsExtension()
        let cs = Int64(clusterSize)
        var newExt: Qcow2BitmapsExtension?
        if !list.isEmpty {
            let dir = Qcow2BitmapEntry.encodeDirectory(list)
            guard UInt64(dir.count) <= Qcow2BitmapsExtension.maxDirectorySize else {
                throw BlockError(.invalidArgument, "Bitmap directory is too large", path: filename, operation: "store bitmaps")
            }
            let clusters = (Int64(dir.count) + cs - 1) / cs
            let off = try await allocateClusters(clusters)
            do {
                try await hostFile.write(at: off, bytes: dir)
                // Counted and written before anything points at it.
                try await l2Cache.flush()
                try await refcountCache.flush()
                try await hostFile.flush()
            } catch {
                try? await freeClusters(at: off, count: clusters)
                throw error
            }
            newExt = Qcow2BitmapsExtension(count: UInt32(list.count), directorySize: UInt64(dir.count), directoryOffset: UInt64(off))
        }
        let savedHeader = header
        if let newExt {
            header.autoclearFeatures |= Qcow2Header.autoclearBitmaps
            header.setBitmapsExtension(newExt)
        } else {
            header.autoclearFeatures &= ~Qcow2Header.autoclearBitmaps
            header.setBitmapsExtension(nil)
        }
        do {
            try await writeHeader()
            try await hostFile.flush()
        } catch {
            header = savedHeader
            if let n = newExt { try? await freeClusters(at: Int64(n.directoryOffset), count: (Int64(n.directorySize) + cs - 1) / cs) }
            throw error
        }
        bitmapDirectory = list
        if let old, old.directorySize > 0 {
            try? await freeClusters(at: Int64(old.directoryOffset), count: (Int64(old.directorySize) + cs - 1) / cs)
        }
    }

    /// Frees the table of `e` and its data clusters (QEMU's `free_bitmap_clusters`).
    func freeBitmapClusters(_ e: Qcow2BitmapEntry) async throws {
        guard e.tableOffset != 0, e.tableSize != 0 else { return }
        let table = try await readBitmapTable(e)
        for entry in table {
            let off = entry & Qcow2BitmapEntry.tableOffsetMask
            // Data clusters are discarded in the file too (QEMU's QCOW2_DISCARD_ALWAYS).
            if off != 0 { try await freeClusters(at: Int64(off), count: 1, discardHost: true) }
        }
        let cs = Int64(clusterSize)
        try await freeClusters(at: Int64(e.tableOffset), count: (Int64(e.tableSize) * 8 + cs - 1) / cs)
    }
}
