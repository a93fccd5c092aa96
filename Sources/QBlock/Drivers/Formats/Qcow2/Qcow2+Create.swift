#if canImport(Glibc)
import Glibc
#endif
import QBlockCore
import QBlockGraph

/// Creating qcow2 images with the layout QEMU gives them: the header in cluster 0, the
/// refcount table in cluster 1, the first refcount block in cluster 2, the L1 table from
/// cluster 3 on.
extension Qcow2Node {
    /// Creates (or overwrites) a qcow2 image at `path` with virtual size `size`.
    /// - Throws: ``BlockError`` `.invalidArgument` for option combinations qemu-img refuses.
    public static func create(path: String, size: Int64, options o: Qcow2CreateOptions) async throws {
        // qemu-img rounds the size up to whole 512-byte sectors.
        let requested = size
        let size: Int64
        do {
            size = try checkCreate(size: requested < 0 ? requested : (requested + 511) / 512 * 512, options: o)
        } catch let e as BlockError where e.errno == EFBIG {
            // QEMU's bdrv_create words a too large size this way (the cluster size has a default).
            throw BlockError(.invalidArgument, "The image size is too large for file format 'qcow2' (try using a larger cluster size)",
                             errno: EFBIG)
        }
        let file = try FileNode(path: path, readOnly: false, perm: [.consistentRead, .write, .resize],
                                shared: [.consistentRead, .writeUnchanged], create: true)
        do {
            try await file.truncate(to: 0, preallocation: .off)
            if o.nocow { FileCreation.setNoCOW(path) }
            FileCreation.setExtentSizeHint(path, o.extentSizeHint ?? FileCreation.defaultExtentSizeHint)
            try await format(file, size: size, options: o)
        } catch {
            try? await file.close()
            throw error
        }
        try await file.close()
    }

    /// Writes a new qcow2 image of virtual size `size` onto `file`, an open, writable
    /// protocol node (QEMU's `blockdev-create` with a qcow2 `file` node): the same layout
    /// as ``create(path:size:options:)``. `file` stays open; its old content is overwritten
    /// from offset 0 (a longer file keeps its length).
    /// - Throws: ``BlockError`` `.invalidArgument` for options QEMU refuses (size not a
    ///   multiple of 512, cluster size, version-dependent features), I/O errors.
    public static func create(on file: any BlockDriver, size: Int64, options o: Qcow2CreateOptions) async throws {
        let size = try checkCreate(size: size, options: o)
        try await format(file, size: size, options: o)
    }

    /// QEMU's checks of the creation options, in its order; returns the size. The size
    /// must be a multiple of 512 (qemu-img rounds it up before).
    @discardableResult
    package static func checkCreate(size: Int64, options o: Qcow2CreateOptions) throws -> Int64 {
        if size < 0 { throw BlockError(.invalidArgument, "Image size must be a non-negative number") }
        if size % 512 != 0 { throw BlockError(.invalidArgument, "Image size must be a multiple of 512 bytes") }
        let cs = o.clusterSize
        guard cs >= 512 && cs <= 2 << 20 && cs & (cs - 1) == 0 else {
            throw BlockError(.invalidArgument, "Cluster size must be a power of two between 512 and 2048k")
        }
        let rb = o.refcountBits
        guard rb > 0 && rb <= 64 && rb & (rb - 1) == 0 else {
            throw BlockError(.invalidArgument, "Refcount width must be a power of two and may not exceed 64 bits")
        }
        if o.version < 3 {
            if o.lazyRefcounts {
                throw BlockError(.invalidArgument, "Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)")
            }
            if o.refcountBits != 16 {
                throw BlockError(.invalidArgument, "Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)")
            }
            if o.compressionType != .zlib {
                throw BlockError(.invalidArgument, "Non-zlib compression type is only supported with compatibility level 1.1 and above (use version=v3 or greater)")
            }
        }
        if o.extendedL2 {
            throw BlockError(.unsupported, "Extended L2 entries are not supported by this implementation")
        }
        if o.backingFile != nil && o.preallocation != .off {
            throw BlockError(.invalidArgument, "Backing file and preallocation can only be used at the same time if extended_l2 is on")
        }
        if o.backingFormat != nil && o.backingFile == nil {
            throw BlockError(.invalidArgument, "Backing format cannot be used without backing file")
        }
        let l2Entries = Int64(cs / 8)
        let neededL1 = (size + Int64(cs) * l2Entries - 1) / (Int64(cs) * l2Entries)
        if neededL1 > (32 << 20) / 8 {
            throw BlockError(.invalidArgument, "Could not resize image: The image size is too large for the cluster size",
                             errno: EFBIG)
        }
        return size
    }

    /// Writes header, refcount table and first refcount block at offset 0 of `file`, then
    /// grows the image to `size` (allocating the L1 table) and sets the backing file.
    private static func format(_ file: any BlockDriver, size: Int64, options o: Qcow2CreateOptions) async throws {
        let cs = o.clusterSize
        var h = Qcow2Header()
        h.version = UInt32(o.version)
        h.clusterBits = UInt32(cs.trailingZeroBitCount)
        h.size = 0
        h.refcountOrder = UInt32(o.refcountBits.trailingZeroBitCount)
        h.headerLength = o.version >= 3 ? 112 : 72
        h.refcountTableOffset = UInt64(cs)
        h.refcountTableClusters = 1
        if o.lazyRefcounts { h.compatibleFeatures |= Qcow2Header.compatibleLazyRefcounts }
        if o.compressionType == .zstd {
            h.incompatibleFeatures |= Qcow2Header.Incompatible.compressionType
            h.compressionType = o.compressionType.rawValue
        }
        var headerBytes = try h.encode()
        headerBytes.append(contentsOf: [UInt8](repeating: 0, count: cs - headerBytes.count))

        // The empty image: header, refcount table, one refcount block counting clusters 0-2.
        var rt = [UInt8](repeating: 0, count: cs)
        rt.setBE64(0, UInt64(2 * cs))
        var rb = [UInt8](repeating: 0, count: cs)
        let bits = o.refcountBits
        for c in 0..<3 { setRaw(&rb, index: c, bits: bits, value: 1) }
        try await file.write(at: 0, bytes: headerBytes)
        try await file.write(at: Int64(cs), bytes: rt)
        try await file.write(at: Int64(2 * cs), bytes: rb)
        try await file.flush()

        // Grow it to its size (allocating the L1 table) and set the backing file, through
        // a qcow2 node on the file that leaves the file open when it closes.
        var openOptions = OpenOptions(format: "qcow2")
        openOptions.openBacking = false
        let q = try await Qcow2Node.open(file: UnclosedDriver(file), options: openOptions) { _, _ in
            throw BlockError(.internalError, "no backing file is opened while creating")
        }
        do {
            if o.backingFile != nil {
                await q.metaLock.lock()
                q.header.backingFileName = o.backingFile
                q.header.backingFormat = o.backingFormat
                do { try await q.writeHeader() } catch { q.metaLock.unlock(); throw error }
                q.metaLock.unlock()
            }
            try await q.truncate(to: size, preallocation: o.preallocation)
            try await q.flush()
        } catch {
            try? await q.close()
            throw error
        }
        try await q.close()
    }

    /// Sets a refcount of a refcount block held in a byte array (create time only).
    private static func setRaw(_ b: inout [UInt8], index i: Int, bits: Int, value: UInt64) {
        switch bits {
        case 1, 2, 4:
            let per = 8 / bits
            let shift = UInt8(bits * (i % per))
            let mask = UInt8((1 << bits) - 1)
            b[i / per] = (b[i / per] & ~(mask << shift)) | (UInt8(value) & mask) << shift
        case 8: b[i] = UInt8(value)
        case 16: b[i * 2] = UInt8(value >> 8); b[i * 2 + 1] = UInt8(value & 0xff)
        case 32: b.setBE32(i * 4, UInt32(value))
        default: b.setBE64(i * 8, value)
        }
    }
}

/// Resizing: growing the L1 table, preallocating; shrinking is in `Qcow2+Shrink.swift`.
extension Qcow2Node {
    /// Resizes the virtual disk to `newSize` bytes (a multiple of 512), growing the L1 table
    /// as needed; `preallocation` applies to the new area (QEMU's `qcow2_co_truncate`).
    /// A v2 image with internal snapshots is not resized (QEMU's rule).
    /// - Throws: ``BlockError`` `.closed` after ``close()``, `.readOnly`, `.invalidArgument` for a size QEMU refuses, or an I/O error.
    public func truncate(to newSize: Int64, preallocation: Preallocation) async throws {
        try gate.enter(filename, "truncate")
        defer { gate.leave() }
        try await truncateAdmitted(to: newSize, preallocation: preallocation)
    }

    /// ``truncate(to:preallocation:)`` for a request the gate already admitted (``amend(_:)``).
    func truncateAdmitted(to newSize: Int64, preallocation: Preallocation) async throws {
        try checkWritable("truncate")
        if newSize % 512 != 0 {
            throw BlockError(.invalidArgument, "The new size must be a multiple of 512", path: filename, operation: "truncate")
        }
        // As QEMU: a v2 snapshot table entry need not record the disk size it was taken at,
        // so a v2 image with snapshots keeps its size; v3 entries do (and a snapshot goes
        // back to its size when applied), so a v3 image may grow or shrink.
        if header.nbSnapshots > 0 && header.version < 3 {
            throw BlockError(.unsupported, "Can't resize a v2 image which has snapshots", errno: ENOTSUP,
                             path: filename, operation: "truncate")
        }
        // QEMU's qcow2_truncate_bitmaps_check: loaded bitmaps are resized in memory and
        // stored with the new size; one that cannot be used blocks the resize.
        for b in persistentBitmaps.all where b.isPersistent {
            if let e = b.useError() { throw e }
        }
        defer { persistentBitmaps.resize(to: Int64(header.size)) }
        let oldSize = Int64(header.size)
        try await metaLock.withLock {
            let old = Int64(header.size)
            if newSize < old {
                try await shrink(to: newSize, preallocation: preallocation)
                return
            }
            let cs = Int64(clusterSize)
            let neededL1 = Int((newSize + cs * Int64(l2Entries) - 1) / (cs * Int64(l2Entries)))
            if neededL1 > (32 << 20) / 8 {
                throw BlockError(.invalidArgument, "The image size is too large for the cluster size", path: filename, operation: "truncate")
            }
            if neededL1 > l1Table.count { try await growL1(to: neededL1) }
            if preallocation != .off && newSize > old {
                try await preallocate(from: old, to: newSize, mode: preallocation)
            }
            header.size = UInt64(newSize)
            var f: [UInt8] = []
            f.appendBE64(header.size)
            try await hostFile.write(at: 24, bytes: f)
            try await hostFile.flush()
        }
        // As QEMU's bdrv_co_truncate: when the backing file reaches past the old end, the
        // area the image gains must read as zeros, not as the backing file's old data there
        // (data the guest never wrote, e.g. after a shrink and a grow; iotests 292).
        if newSize > oldSize, preallocation == .off, let backing = backingNode, backing.length > oldSize {
            try await writeZeroesAdmitted(at: oldSize, length: newSize - oldSize, flags: [])
        }
    }

    /// Replaces the L1 table with one of `entries` entries. Lock held.
    func growL1(to entries: Int) async throws {
        let cs = Int64(clusterSize)
        let oldOffset = Int64(header.l1TableOffset)
        let oldClusters = (Int64(l1Table.count) * 8 + cs - 1) / cs
        let clusters = (Int64(entries) * 8 + cs - 1) / cs
        try await l2Cache.flush()
        try await refcountCache.flush()
        let newOffset = try await allocateClusters(clusters)
        try await refcountCache.flush()
        var newTable = l1Table
        newTable.append(contentsOf: [UInt64](repeating: 0, count: entries - l1Table.count))
        var raw: [UInt8] = []
        raw.reserveCapacity(entries * 8)
        for v in newTable { raw.appendBE64(v) }
        try await hostFile.write(at: newOffset, bytes: raw)
        try await hostFile.flush()
        var f: [UInt8] = []
        f.appendBE32(UInt32(entries))
        f.appendBE64(UInt64(newOffset))
        try await hostFile.write(at: 36, bytes: f)
        try await hostFile.flush()
        header.l1Size = UInt32(entries)
        header.l1TableOffset = UInt64(newOffset)
        l1Table = newTable
        if oldOffset != 0 && oldClusters > 0 {
            try await freeClusters(at: oldOffset, count: oldClusters, discardHost: passDiscard(.other))
        }
    }

    /// Allocates host clusters for every guest cluster in [from, to). Lock held.
    private func preallocate(from start: Int64, to end: Int64, mode: Preallocation) async throws {
        let cs = Int64(clusterSize)
        var cluster = start / cs
        let last = (end + cs - 1) / cs
        while cluster < last {
            let l1Index = Int(cluster / Int64(l2Entries))
            let firstL2 = Int(cluster % Int64(l2Entries))
            let n = min(last - cluster, Int64(l2Entries - firstL2))
            let t = try await l2TableForWrite(l1Index)
            l2Cache.pin(t)
            defer { l2Cache.release(t) }
            var pending: [Int] = []
            for i in 0..<Int(n) where kind(of: t.bytes.be64((firstL2 + i) * 8)) == .unallocated {
                pending.append(i)
            }
            if !pending.isEmpty {
                let host = try await allocateClusters(Int64(pending.count))
                // Dependency first (see commitAllocation), then the new references.
                try await l2Cache.setDependency(on: refcountCache)
                for (k, i) in pending.enumerated() {
                    t.bytes.setBE64((firstL2 + i) * 8, UInt64(host + Int64(k) * cs) | Qcow2Node.copied)
                }
                l2Cache.markDirty(t)
            }
            cluster += n
        }
        try await l2Cache.flush()
        try await refcountCache.flush()
        // Make the file cover every allocated cluster.
        let fileEnd = endCluster * cs
        let current = hostFile.length
        if fileEnd > current {
            let fileMode: Preallocation = mode == .metadata ? .off : mode
            try await hostFile.truncate(to: fileEnd, preallocation: fileMode)
        }
    }
}
