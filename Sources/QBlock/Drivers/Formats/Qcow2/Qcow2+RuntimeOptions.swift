import QBlockCore
import QBlockGraph

/// The qcow2 driver's runtime options (QEMU's `qcow2_runtime_opts`): what `blockdev-add`,
/// `json:` names, `--image-opts` and `open -o` may set at open, and qemu-io's `reopen -o`
/// may change later. Nil members take the defaults (from the image header where QEMU
/// takes them from there).
public struct Qcow2RuntimeOptions: FormatOpenOptions, Equatable {
    /// `lazy-refcounts`: leave refcount updates cached while the image is marked dirty
    /// (nil: the header's compatible feature bit).
    public var lazyRefcounts: Bool?
    /// `cache-size`: the L2 and refcount caches together, in bytes.
    public var cacheSize: UInt64?
    /// `l2-cache-size`: the L2 cache, in bytes.
    public var l2CacheSize: UInt64?
    /// `refcount-cache-size`: the refcount block cache, in bytes.
    public var refcountCacheSize: UInt64?
    /// `l2-cache-entry-size`: the size of one L2 cache entry (checked as QEMU checks it; this
    /// implementation caches whole L2 tables).
    public var l2CacheEntrySize: UInt64?
    /// `pass-discard-request`: a guest discard (or zeroing that may unmap) frees the host
    /// clusters with a discard of the file too (nil: as the node's `discard` mode says —
    /// `unmap`, the tools' default, or `ignore`, `blockdev-add`'s).
    public var passDiscardRequest: Bool?
    /// `pass-discard-snapshot`: clusters freed by deleting a snapshot are discarded in the
    /// file (nil: on).
    public var passDiscardSnapshot: Bool?
    /// `pass-discard-other`: clusters freed otherwise (a copy-on-write replacing a cluster,
    /// a table moved) are discarded in the file (nil: off).
    public var passDiscardOther: Bool?

    /// Options with every member at its default.
    public init() {}

    /// The option names these members are read from.
    public static let keys: Set<String> = ["lazy-refcounts", "cache-size", "l2-cache-size", "l2-cache-entry-size", "refcount-cache-size",
                                           "pass-discard-request", "pass-discard-snapshot", "pass-discard-other",
                                           "overlap-check", "cache-clean-interval"]

    /// Reads the members from `m` (absent members stay nil).
    /// - Throws: the reader's error for a member of the wrong type.
    public static func read(_ m: any DriverOptionReader) throws -> Qcow2RuntimeOptions {
        var o = Qcow2RuntimeOptions()
        o.lazyRefcounts = try m.optionalBool("lazy-refcounts")
        o.cacheSize = try m.optionalUInt("cache-size", bits: 64)
        o.l2CacheSize = try m.optionalUInt("l2-cache-size", bits: 64)
        o.l2CacheEntrySize = try m.optionalUInt("l2-cache-entry-size", bits: 64)
        o.refcountCacheSize = try m.optionalUInt("refcount-cache-size", bits: 64)
        o.passDiscardRequest = try m.optionalBool("pass-discard-request")
        o.passDiscardSnapshot = try m.optionalBool("pass-discard-snapshot")
        o.passDiscardOther = try m.optionalBool("pass-discard-other")
        // Metadata overlap checks and the periodic cleaning of unused cache entries are not
        // implemented: only the values that ask for neither are taken.
        if let v = m.value("overlap-check") {
            var none = false
            switch v {
            case .string(let mode): none = mode == "none"
            case .dict(let d):
                none = d.entries.allSatisfy { k, v in
                    k == "template" ? v == .string("none") : (v == .bool(false) || v == .string("off"))
                }
            default: break
            }
            if !none {
                throw BlockError(.unsupported, "overlap-check: metadata overlap checks are not implemented by this implementation (only 'none' is accepted)")
            }
        }
        if let interval = try m.optionalUInt("cache-clean-interval", bits: 32), interval != 0 {
            throw BlockError(.unsupported, "cache-clean-interval: cleaning unused cache entries is not implemented by this implementation (only 0 is accepted)")
        }
        return o
    }

    /// Whether any cache size option is given (otherwise the node keeps its own defaults).
    var setsCacheSizes: Bool { cacheSize != nil || l2CacheSize != nil || refcountCacheSize != nil || l2CacheEntrySize != nil }
}

/// How many tables each metadata cache holds.
struct Qcow2CacheCapacities: Equatable {
    var l2: Int
    var refcount: Int
}

extension Qcow2Node {
    /// The fewest tables a cache holds (a copy-on-write touches two L2 tables at once).
    static let minimumCacheTables = 4
    /// QEMU's `DEFAULT_L2_CACHE_MAX_SIZE`.
    static let defaultL2CacheMax: UInt64 = 32 << 20

    /// The cache capacities for `options` on an image of `header`, with QEMU's rules and
    /// messages (`read_cache_sizes`): `cache-size` is split between the two caches, and
    /// neither part may exceed it; the three may not all be given; an L2 cache entry is a
    /// power of two between 512 and the cluster size. Without any size option the default:
    /// enough L2 tables to cover the disk, at most 32 MiB, at least 1 MiB.
    /// - Throws: ``BlockError`` `.invalidArgument` with QEMU's message.
    static func cacheCapacities(_ options: Qcow2RuntimeOptions, header: Qcow2Header, legacyL2Bytes: Int?) throws -> Qcow2CacheCapacities {
        let cs = UInt64(header.clusterSize)
        let entryBytes: UInt64 = header.incompatibleFeatures & Qcow2Header.Incompatible.extendedL2 != 0 ? 16 : 8
        let maxL2Entries = (header.size + cs - 1) / cs
        let maxL2Cache = (maxL2Entries * entryBytes + cs - 1) / cs * cs
        guard options.setsCacheSizes else {
            let coverPerTable = cs * (cs / 8)
            let needed = (header.size + coverPerTable - 1) / coverPerTable
            let l2Bytes = legacyL2Bytes.map { UInt64(max(0, $0)) } ?? min(32 << 20, max(needed * cs, 1 << 20))
            let l2 = max(minimumCacheTables, Int(min(l2Bytes / cs, UInt64(Int32.max))))
            return Qcow2CacheCapacities(l2: l2, refcount: max(minimumCacheTables, l2 / 4))
        }
        let minRefcount = UInt64(minimumCacheTables) * cs
        var l2Bytes = min(maxL2Cache, options.l2CacheSize ?? defaultL2CacheMax)
        var refcountBytes = options.refcountCacheSize ?? 0
        if let combined = options.cacheSize {
            if options.l2CacheSize != nil && options.refcountCacheSize != nil {
                throw BlockError(.invalidArgument, "cache-size, l2-cache-size and refcount-cache-size may not be set at the same time")
            } else if let l2 = options.l2CacheSize, l2 > combined {
                throw BlockError(.invalidArgument, "l2-cache-size may not exceed cache-size")
            } else if refcountBytes > combined {
                throw BlockError(.invalidArgument, "refcount-cache-size may not exceed cache-size")
            }
            if options.l2CacheSize != nil {
                refcountBytes = combined - l2Bytes   // (l2Bytes ≤ the l2-cache-size given ≤ cache-size)
            } else if options.refcountCacheSize != nil {
                l2Bytes = combined - refcountBytes
            } else if combined >= maxL2Cache + minRefcount {
                l2Bytes = maxL2Cache
                refcountBytes = combined - l2Bytes
            } else {
                refcountBytes = min(combined, minRefcount)
                l2Bytes = combined - refcountBytes
            }
        }
        var entrySize = options.l2CacheEntrySize ?? cs
        if l2Bytes < maxL2Cache && options.l2CacheEntrySize == nil { entrySize = min(cs, 4096) }
        if entrySize < 512 || entrySize > cs || entrySize & (entrySize - 1) != 0 {
            throw BlockError(.invalidArgument, "L2 cache entry size must be a power of two between 512 and the cluster size (\(cs))")
        }
        // This cache holds whole L2 tables: as many as cover what QEMU's entries would.
        let l2 = max(minimumCacheTables, Int(min(l2Bytes / cs, UInt64(Int32.max))))
        let refcount = max(minimumCacheTables, Int(min(refcountBytes / cs, UInt64(Int32.max))))
        return Qcow2CacheCapacities(l2: l2, refcount: refcount)
    }

    /// The lazy-refcounts mode `options` ask for on an image of `header`.
    /// - Throws: ``BlockError`` `.invalidArgument` for lazy refcounts on a version 2 image
    ///   (QEMU's message).
    static func lazyRefcounts(_ options: Qcow2RuntimeOptions, header: Qcow2Header) throws -> Bool {
        let lazy = options.lazyRefcounts ?? (header.compatibleFeatures & Qcow2Header.compatibleLazyRefcounts != 0)
        if lazy && header.version < 3 {
            throw BlockError(.invalidArgument, "Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level")
        }
        return lazy
    }

    /// Checks `options` for this image as ``reopen(options:)`` would, changing nothing.
    /// - Throws: ``BlockError`` `.invalidArgument` with QEMU's message.
    public func checkReopen(options: Qcow2RuntimeOptions) throws {
        _ = try Self.cacheCapacities(options, header: header, legacyL2Bytes: nil)
        _ = try Self.lazyRefcounts(options, header: header)
    }

    /// Changes the runtime options of the open image (qemu-io's `reopen -o`, QEMU's
    /// `qcow2_reopen_prepare` and commit): checks them all first, then writes back and
    /// resizes the metadata caches and switches lazy refcounts (turning them off writes the
    /// refcounts and clears the dirty bit, as QEMU's `qcow2_mark_clean`). Options left out
    /// go back to their defaults. Call it with no request in flight.
    /// - Throws: ``BlockError`` `.invalidArgument` for options QEMU refuses (its messages),
    ///   I/O errors from writing the caches back; the node then keeps its options.
    public func reopen(options: Qcow2RuntimeOptions) async throws {
        try gate.enter(filename, "reopen")
        defer { gate.leave() }
        try await metaLock.withLock {
            let capacities = try Self.cacheCapacities(options, header: header, legacyL2Bytes: nil)
            let lazy = try Self.lazyRefcounts(options, header: header)
            if !isReadOnly {
                try await retryPendingFrees()
                try await l2Cache.flush()
                try await refcountCache.flush()
            }
            if useLazyRefcounts && !lazy && !isReadOnly {
                try await hostFile.flush()
                try await markCleanLocked()
            }
            try l2Cache.reset(capacity: capacities.l2)
            try refcountCache.reset(capacity: capacities.refcount)
            useLazyRefcounts = lazy
            runtimeOptions = options
        }
    }
}

/// Why qcow2 frees host clusters, for the choice whether to discard them in the file too
/// (QEMU's `enum qcow2_discard_type`; metadata moved or dropped is always discarded).
enum Qcow2DiscardType {
    /// A guest's discard or zeroing that may unmap.
    case request
    /// Deleting an internal snapshot.
    case snapshot
    /// Anything else: a copy-on-write replacing a cluster, a table moved.
    case other
}

extension Qcow2Node {
    /// Whether clusters freed for `type` are discarded in the file (the `pass-discard-*`
    /// options, with QEMU's defaults: requests as the node's discard mode, snapshots on,
    /// others off).
    func passDiscard(_ type: Qcow2DiscardType) -> Bool {
        switch type {
        case .request: return runtimeOptions.passDiscardRequest ?? discardRequestDefault
        case .snapshot: return runtimeOptions.passDiscardSnapshot ?? true
        case .other: return runtimeOptions.passDiscardOther ?? false
        }
    }
}
