import QBlockCore
import QBlockGraph
/// The capability protocols a qcow2 node has (`Graph/Capabilities.swift`), and the small
/// adapters from the protocols' format-independent types to qcow2's own. The work is done
/// in the files named beside each conformance.

// Qcow2+BackingLink.swift, Qcow2+Amend.swift (setBackingFile), Qcow2+Shrink.swift (makeEmpty).
extension Qcow2Node: ClusteredFormat, BackingLinked, Emptiable {}

// MARK: Internal snapshots (Qcow2+Snapshots.swift, Qcow2+SnapshotTable.swift)

extension Qcow2Node: InternalSnapshotting {
    /// The internal snapshots in the snapshot table, in table order (`qemu-img snapshot -l`).
    public var internalSnapshots: [SnapshotInfo] { snapshots().map(\.info) }

    /// The snapshot whose ID is `id` and/or whose name is `name` (both given: both must match),
    /// or `nil` (QEMU's `bdrv_snapshot_find_by_id_and_name`).
    public func findInternalSnapshot(id: String?, name: String?) -> SnapshotInfo? {
        findSnapshot(id: id, name: name)?.info
    }

    /// Creates an internal snapshot of the current state named `name`, recording the guest's
    /// instruction count `icount` if any (`qemu-img snapshot -c`, QMP
    /// `blockdev-snapshot-internal-sync`).
    /// - Returns: the new snapshot's table entry.
    /// - Throws: ``BlockError`` `.readOnly`, `.closed`, or an I/O error; nothing is half-created.
    @discardableResult
    public func createInternalSnapshot(name: String, icount: UInt64?) async throws -> SnapshotInfo {
        try await createSnapshot(name: name, icount: icount).info
    }

    /// A read-only view of a snapshot found by `id`/`name`, or by `orName` as either an ID or
    /// a name (how `qemu-img convert -l` and `-s` look it up).
    /// - Throws: ``BlockError`` `.notFound` when no snapshot matches.
    public func internalSnapshotReader(id: String?, name: String?, orName: String?) async throws -> any BlockDriver {
        try await snapshotReader(id: id, name: name, orName: orName)
    }
}

// MARK: Persistent bitmaps (Qcow2+Bitmaps*.swift)

extension Qcow2Node: PersistentBitmapStore {
    /// Only version 3 images have the bitmaps extension.
    public var supportsPersistentBitmaps: Bool { header.version >= 3 }

    /// The warning QEMU prints when the image was opened with bitmaps that an older program may
    /// have made stale (autoclear bit cleared), or `nil`.
    public var staleBitmapsWarning: String? {
        guard openedWithStaleBitmaps else { return nil }
        let what = header.version < 3
            ? "This qcow2 v2 image contains bitmaps, but they may have been modified by a program without persistent bitmap support; so now they must all be considered inconsistent"
            : "a program lacking bitmap support modified this file, so all bitmaps are now considered inconsistent"
        return what + "\nSome clusters may be leaked, run 'qemu-img check -r' on the image file to fix."
    }
}

// MARK: Maintenance (Qcow2+Amend.swift, Qcow2+Check.swift)

extension Qcow2Node: Amendable {
    /// Applies `qemu-img amend -o` options (`compat`, `lazy_refcounts`, `refcount_bits`,
    /// `size`) to the open image.
    /// - Throws: ``BlockError`` `.invalidArgument` for an unknown or unchangeable option, or
    ///   `.readOnly`/I/O errors while rewriting.
    public func amend(options: [(String, String)]) async throws {
        try await amend(Qcow2AmendOptions.parse(options))
    }
}

extension Qcow2Node: Checkable {}

// MARK: Writing (Qcow2+CompressedWrite.swift, Qcow2+ReadWrite.swift)

extension Qcow2ClusterCompressor: ClusterCompressor {}

extension Qcow2Node: CompressedWriting {
    /// A compressor for this image's compression type and cluster size (one per task).
    /// - Throws: ``BlockError`` `.unsupported` when the compression library is unavailable.
    public func makeClusterCompressor() throws -> any ClusterCompressor { try makeCompressor() }
}

extension Qcow2Node: AllocatingFormat {}

extension Qcow2Node: BlockStatusRecursing {
    /// QEMU's `qcow2_detect_metadata_preallocation`, approximated without refcounts: the
    /// image counts as metadata-preallocated when its host file has clearly more clusters
    /// than are really allocated on disk (every cluster of a qcow2 file is normally in use).
    /// Only host storage knows its allocated size; on any other protocol node (NBD) QEMU's
    /// detection fails with ENOTSUP and the image does not count as preallocated.
    public var recursesBlockStatusIntoFile: Bool {
        guard let host = hostFile as? any HostStorage else { return false }
        let cs = Int64(clusterSize)
        let realClusters = host.allocatedSize / cs
        let threshold = max(realClusters * 10 / 9, realClusters + 2)
        return (host.length + cs - 1) / cs >= threshold
    }
}

// MARK: Information (Qcow2Types.swift)

extension Qcow2Node: FormatInfoReporting {
    /// What `qemu-img info` reports from the driver: cluster size (bytes), the VM state offset
    /// (the virtual size rounded up to what one L1 entry maps, as `qcow2_vm_state_offset`) and
    /// whether the image is marked dirty.
    public var driverInfo: DriverInfo {
        // qcow2_vm_state_offset: the virtual size rounded up to what one L1 entry maps.
        let extendedL2 = header.incompatibleFeatures & Qcow2Header.Incompatible.extendedL2 != 0
        let cs = Int64(clusterSize)
        let perL1 = cs * (cs / (extendedL2 ? 16 : 8))
        return DriverInfo(clusterSize: clusterSize, vmStateOffset: (length + perL1 - 1) / perL1 * perL1, isDirty: dirtyFlag)
    }

    /// The keys QEMU's `ImageInfoSpecificQCow2` has.
    public var formatSpecificInfo: QObject.Dict {
        let i = formatInfo
        var data = QObject.Dict()
        data["compat"] = .string(i.compat)
        if i.compat != "0.10" {
            data["extended-l2"] = .bool(i.extendedL2)
            data["lazy-refcounts"] = .bool(i.lazyRefcounts)
            data["corrupt"] = .bool(i.corrupt)
            if !i.bitmaps.isEmpty { data["bitmaps"] = .list(i.bitmaps.map(\.qobject)) }
        }
        data["refcount-bits"] = .int(Int64(i.refcountBits))
        data["compression-type"] = .string(i.compressionType.name)
        return QObject.Dict([("type", .string("qcow2")), ("data", .dict(data))])
    }

    /// The `Format specific information` lines of `qemu-img info` (human format), in QEMU's order.
    public var formatSpecificSummary: [(label: String, value: String)] {
        let f = formatInfo
        var out: [(label: String, value: String)] = [("compat", f.compat), ("compression type", f.compressionType.name)]
        if f.compat != "0.10" { out.append(("lazy refcounts", "\(f.lazyRefcounts)")) }
        out.append(("refcount bits", "\(f.refcountBits)"))
        if f.compat != "0.10" {
            out.append(("corrupt", "\(f.corrupt)"))
            out.append(("extended l2", "\(f.extendedL2)"))
        }
        return out
    }
}

// MARK: Reopen (Qcow2+Reopen.swift)

extension Qcow2Node: ReopenableDriver {
    /// Switches between read-only and read-write (QEMU's `bdrv_reopen`): going read-only
    /// writes back cached metadata and clears the dirty flag; going read-write reopens the file
    /// writable and marks the image dirty on the first write.
    /// - Throws: ``BlockError`` `.readOnly` when the file cannot be written, or an I/O error.
    public func reopen(readOnly: Bool, cache: CacheMode) async throws {
        if readOnly { try await reopenReadOnly() } else if isReadOnly { try await reopenReadWrite() }
        writeThrough.set(cache.writeThrough)
    }
}

extension Qcow2Node {
    /// Whether the image reads as zeros wherever nothing was written, so that a copy into it
    /// may skip zeros (QEMU's `qcow2_has_zero_init`): an image without preallocated L2
    /// tables does; a preallocated one only if its file does (the caller asks the file).
    /// Takes the metadata lock.
    package func hasPreallocatedL2Tables() async -> Bool {
        await metaLock.lock()
        defer { metaLock.unlock() }
        return (l1Table.first ?? 0) & Qcow2Node.l1OffsetMask != 0
    }
}
