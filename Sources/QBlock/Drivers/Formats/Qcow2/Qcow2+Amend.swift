#if canImport(Glibc)
import Glibc
#endif
import QBlockCore

/// What `qemu-img amend -o ...` may change on a qcow2 image; nil fields stay as they are.
public struct Qcow2AmendOptions: Sendable, Equatable {
    /// 2 (compat=0.10) or 3 (compat=1.1).
    public var version: Int?
    /// Turn the `lazy_refcounts` compatible feature on or off (needs version 3).
    public var lazyRefcounts: Bool?
    /// A new refcount width in bits (1 to 64, a power of two); the refcount structures are
    /// rewritten, as `qemu-img amend -o refcount_bits=` does.
    public var refcountBits: Int?
    /// A new virtual size.
    public var size: Int64?

    /// Creates an amendment; every `nil` argument leaves that property unchanged.
    public init(version: Int? = nil, lazyRefcounts: Bool? = nil, refcountBits: Int? = nil, size: Int64? = nil) {
        self.version = version
        self.lazyRefcounts = lazyRefcounts
        self.refcountBits = refcountBits
        self.size = size
    }

    /// Parses `-o` options as qemu-img amend does for qcow2.
    /// - Throws: ``BlockError`` `.invalidArgument` worded as qemu-img's.
    public static func parse(_ pairs: [(String, String)]) throws -> Qcow2AmendOptions {
        var o = Qcow2AmendOptions()
        // (qcow2's own creation options; the host file's, nocow and extent_size_hint, are no
        // option of qcow2's at all for QEMU.)
        let createOnly: Set<String> = ["cluster_size", "preallocation", "compression_type", "extended_l2", "encryption",
                                       "data_file_raw"]
        for (key, value) in pairs {
            switch key {
            case "compat":
                switch value {
                case "0.10", "v2": o.version = 2
                case "1.1", "v3": o.version = 3
                default: throw BlockError(.invalidArgument, "Unknown compatibility level \(value)")
                }
            case "lazy_refcounts":
                switch value {
                case "on": o.lazyRefcounts = true
                case "off": o.lazyRefcounts = false
                default: throw BlockError(.invalidArgument, "Parameter 'lazy_refcounts' expects 'on' or 'off'")
                }
            case "refcount_bits":
                guard let v = Int(value), v > 0, v <= 64, v & (v - 1) == 0 else {
                    throw BlockError(.invalidArgument, "Refcount width must be a power of two and may not exceed 64 bits")
                }
                o.refcountBits = v
            case "size":
                guard let v = SizeParser.parse(value) else {
                    throw BlockError(.invalidArgument, "Parameter 'size' expects a non-negative number below 2^64\n"
                        + "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.")
                }
                o.size = v
            case "backing_file", "backing_fmt":
                throw BlockError(.invalidArgument, "Cannot amend the backing file\nYou can use 'qemu-img rebase' instead.")
            default:
                if createOnly.contains(key) {
                    throw BlockError(.invalidArgument, "Invalid parameter '\(key)'\nThis option is only supported for image creation")
                }
                throw BlockError(.invalidArgument, "Invalid parameter '\(key)'")
            }
        }
        return o
    }
}

/// Changing header-level properties of an existing image: the backing file (`rebase`),
/// the version and features (`amend`), as QEMU's `qcow2_change_backing_file` and
/// `qcow2_amend_options` do.
extension Qcow2Node {
    /// Rewrites the header to name `name` (nil: none) as the backing file, with format
    /// `format`. The open backing node, if any, is not changed.
    /// - Throws: ``BlockError`` `.noSpace` when the name does not fit in the header cluster.
    public func setBackingFile(_ name: String?, format: String?) async throws {
        try gate.enter(filename, "change backing file")
        defer { gate.leave() }
        try checkWritable("change backing file")
        try await metaLock.withLock {
            let saved = header
            header.backingFileName = (name?.isEmpty ?? true) ? nil : name
            header.backingFormat = header.backingFileName == nil ? nil : format
            do {
                try await writeHeader()
                try await hostFile.flush()
            } catch let e as BlockError where e.code == .invalidArgument {
                header = saved
                throw BlockError(.noSpace, "No space left in the file header", errno: ENOSPC, path: filename,
                                 operation: "change backing file")
            } catch {
                header = saved
                throw error
            }
        }
    }

    /// Applies `options` in QEMU's order: upgrade, refcount width, lazy refcounts, size,
    /// downgrade (so that features a downgrade cannot keep are dropped first).
    /// - Throws: ``BlockError`` with qemu-img's messages for combinations it refuses.
    public func amend(_ options: Qcow2AmendOptions) async throws {
        try gate.enter(filename, "amend")
        defer { gate.leave() }
        try checkWritable("amend")
        let oldVersion = Int(header.version)
        let newVersion = options.version ?? oldVersion
        // Refusals that do not depend on earlier steps come first, so that nothing is written.
        if let bits = options.refcountBits, bits != header.refcountBits {
            if newVersion < 3 {
                throw BlockError(.invalidArgument, "Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)")
            }
        }
        if options.lazyRefcounts == true && newVersion < 3 {
            throw BlockError(.invalidArgument, "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)")
        }
        if newVersion < oldVersion && (options.refcountBits ?? header.refcountBits) != 16 {
            throw BlockError(.unsupported, "compat=0.10 requires refcount_bits=16", path: filename, operation: "amend")
        }
        if newVersion > oldVersion {
            try await metaLock.withLock {
                header.version = 3
                header.headerLength = 112
                header.refcountOrder = 4
                header.compressionType = 0
                try await writeHeader()
                try await hostFile.flush()
            }
        }
        if let bits = options.refcountBits, bits != header.refcountBits {
            try await changeRefcountWidth(to: bits)
        }
        let lazyNow = header.compatibleFeatures & Qcow2Header.compatibleLazyRefcounts != 0
        if let lazy = options.lazyRefcounts, lazy != lazyNow {
            if lazy && newVersion < 3 {
                throw BlockError(.invalidArgument, "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)")
            }
            try await metaLock.withLock {
                if lazy { header.compatibleFeatures |= Qcow2Header.compatibleLazyRefcounts }
                else { header.compatibleFeatures &= ~Qcow2Header.compatibleLazyRefcounts }
                useLazyRefcounts = lazy
                try await writeHeader()
                try await hostFile.flush()
            }
        }
        if let size = options.size, size != Int64(header.size) {
            try await truncateAdmitted(to: size, preallocation: .off)
        }
        if newVersion < oldVersion {
            try await downgrade()
        }
        try await flushAdmitted()
    }

    /// compat=1.1 → 0.10: zero clusters become unallocated (no backing file) or clusters of
    /// explicit zeros, lazy refcounts are switched off, and the header loses its v3 fields.
    private func downgrade() async throws {
        if header.refcountOrder != 4 {
            throw BlockError(.unsupported, "compat=0.10 requires refcount_bits=16", path: filename, operation: "amend")
        }
        // As QEMU: v2 readers need not know a snapshot's own disk size or a VM state past
        // 32 bits, so a snapshot with either would be misread after the downgrade.
        if snapshotList.contains(where: { $0.vmStateSize > UInt64(UInt32.max) || $0.diskSize != header.size }) {
            throw BlockError(.unsupported, "Internal snapshots prevent downgrade of image", errno: ENOTSUP,
                             path: filename, operation: "amend")
        }
        try await metaLock.withLock {
            if header.compressionType != 0, try await hasCompressedClusters() {
                throw BlockError(.unsupported, "Cannot downgrade an image with zstd compression type and existing compressed clusters",
                                 path: filename, operation: "amend")
            }
            try await expandZeroClusters()
            try await l2Cache.flush()
            try await refcountCache.flush()
            try await hostFile.flush()
            header.version = 2
            header.headerLength = UInt32(Qcow2Header.v2Length)
            header.incompatibleFeatures = 0
            header.compatibleFeatures = 0
            header.autoclearFeatures = 0
            header.compressionType = 0
            // v2 has no autoclear bits, so bitmaps cannot be kept: like QEMU, their clusters
            // are left behind as leaks (`check -r leaks` frees them); unlike QEMU, the then
            // stale extension is dropped rather than warned about at every open.
            header.otherExtensions.removeAll { $0.type == Qcow2Header.ExtensionType.bitmaps.rawValue }
            for b in persistentBitmaps.all { persistentBitmaps.remove(b) }
            bitmapDirectory = []
            try await writeHeader()
            try await hostFile.flush()
        }
    }

    /// Whether any active L2 entry is compressed. Lock held.
    private func hasCompressedClusters() async throws -> Bool {
        for i in 0..<l1Table.count {
            let l2 = try await l2Offset(i)
            if l2 == 0 { continue }
            let t = try await l2Cache.get(l2)
            for j in 0..<l2Entries where kind(of: t.bytes.be64(j * 8)) == .compressed { return true }
        }
        return false
    }

    /// Replaces every zero cluster, in the active L1 table and in every snapshot's, with
    /// something a v2 reader understands (QEMU's `qcow2_expand_zero_clusters`): without a
    /// backing file an unallocated zero cluster becomes unallocated; otherwise it gets a
    /// newly allocated cluster of zeros; a preallocated zero cluster has its data zeroed.
    ///
    /// L2 tables are changed in place even when snapshots share them: what they read does
    /// not change for any L1 table referencing them. A new data cluster gets the L2
    /// table's refcount (every sharer references it) and the COPIED flag only when that
    /// count is 1. Lock held.
    private func expandZeroClusters() async throws {
        let hasBacking = backingNode != nil || header.backingFileName != nil
        let cs = Int64(clusterSize)
        let zeros = AlignedBuffer(count: clusterSize)
        var l1s: [[UInt64]] = [l1Table]
        // (Each snapshot's L1 table checked first, as QEMU's qcow2_expand_zero_clusters: an
        // entry with a bad offset or size fails the downgrade before anything is read.)
        for sn in snapshotList where sn.l1Size > 0 {
            do {
                l1s.append(try await readSnapshotL1(sn))
            } catch let e as BlockError where e.operation == Qcow2Node.validateSnapshotL1Operation {
                let err = e.errno ?? EINVAL
                throw BlockError(e.code, "Failed to turn zero into data clusters: \(BlockError.strerror(err))", errno: err,
                                 path: filename, operation: "amend", underlying: e)
            }
        }
        var visited = Set<Int64>()
        // References dropped: applied once the L2 tables no longer point there are on disk.
        var released: [(cluster: Int64, count: Int64)] = []
        for l1 in l1s {
            for e in l1 {
                let l2 = Int64(e & Qcow2Node.l1OffsetMask)
                guard l2 != 0, visited.insert(l2).inserted else { continue }
                let t = try await l2Cache.get(l2)
                var any = false
                for j in 0..<l2Entries {
                    let k = kind(of: t.bytes.be64(j * 8))
                    if k == .zero || k == .zeroAllocated { any = true; break }
                }
                if !any { continue }
                let l2Refcount = try await refcount(of: l2 / cs)
                l2Cache.pin(t)
                defer { l2Cache.release(t) }
                for j in 0..<l2Entries {
                    let entry = t.bytes.be64(j * 8)
                    switch kind(of: entry) {
                    case .zero:
                        if !hasBacking {
                            t.bytes.setBE64(j * 8, 0)
                        } else {
                            let host = try await allocateClusters(1)
                            if l2Refcount > 1 { try await updateRefcount(host / cs, by: Int64(l2Refcount) - 1) }
                            // SAFETY: `zeros` is at least one cluster and is kept alive by the async
                            // closure until the write returns (also below).
                            try await zeros.withUnsafeBytes { try await hostFile.write(at: host, from: $0, flags: []) }
                            try await l2Cache.setDependency(on: refcountCache)
                            t.bytes.setBE64(j * 8, UInt64(host) | (l2Refcount == 1 ? Qcow2Node.copied : 0))
                        }
                        l2Cache.markDirty(t)
                    case .zeroAllocated:
                        let host = Int64(entry & Qcow2Node.l2OffsetMask)
                        if try await refcount(of: host / cs) <= l2Refcount {
                            // Only this table's sharers use the cluster: zero it in place.
                            try await zeros.withUnsafeBytes { try await hostFile.write(at: host, from: $0, flags: []) }
                            t.bytes.setBE64(j * 8, entry & ~Qcow2Node.zeroFlag)
                        } else {
                            // Another table reads the cluster as data: give this one its own zeros.
                            let fresh = try await allocateClusters(1)
                            if l2Refcount > 1 { try await updateRefcount(fresh / cs, by: Int64(l2Refcount) - 1) }
                            try await zeros.withUnsafeBytes { try await hostFile.write(at: fresh, from: $0, flags: []) }
                            try await l2Cache.setDependency(on: refcountCache)
                            t.bytes.setBE64(j * 8, UInt64(fresh) | (l2Refcount == 1 ? Qcow2Node.copied : 0))
                            released.append((host / cs, Int64(l2Refcount)))
                        }
                        l2Cache.markDirty(t)
                    default:
                        break
                    }
                }
            }
        }
        if !released.isEmpty {
            try await l2Cache.flush()
            try await hostFile.flush()
            for r in released { try await updateRefcount(r.cluster, by: -r.count) }
        }
    }
}
