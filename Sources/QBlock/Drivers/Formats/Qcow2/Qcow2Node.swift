#if canImport(Glibc)
import Glibc
#endif
import QBlockBitmaps
import QBlockCore
import QBlockGraph

/// The qcow2 format driver (QEMU's `docs/interop/qcow2.txt`), versions 2 and 3.
///
/// The driver is split by on-disk structure, as QEMU's is:
/// - `Qcow2+Header.swift`: the header and its extensions;
/// - `Qcow2+MetadataCache.swift`: the write-back cache of L2 tables and refcount blocks;
/// - `Qcow2+Refcount.swift`: refcounts and cluster allocation;
/// - `Qcow2+Cluster.swift`: guest-to-host mapping through L1 and L2 tables;
/// - `Qcow2+ReadWrite.swift`: the data path (reads, allocating writes, zeroes, discard);
/// - `Qcow2+Compression.swift`: compressed clusters (deflate, zstd);
/// - `Qcow2+Create.swift`, `Qcow2+Check.swift`, `Qcow2+Resize.swift`;
/// - `Qcow2+Bitmaps.swift`, `Qcow2+BitmapsLoad.swift`, `Qcow2+BitmapsStore.swift`: persistent dirty bitmaps.
///
/// Concurrency: metadata (L1, L2 and refcount tables, the header) is only touched with
/// ``metaLock`` held, like QEMU's `s->lock`; guest data moves without it. Clusters being
/// allocated are tracked in ``inflight`` so that two writes to the same unallocated
/// cluster never allocate it twice.
///
/// Ownership: the node owns its file and backing nodes. ``close()`` waits for the requests
/// in flight, writes everything back (metadata caches, persistent bitmaps), clears the dirty
/// bit and closes the children; every call after it throws ``BlockError`` with code
/// `.closed`. An image dropped without ``close()`` is handled as `Qcow2+Lifecycle.swift`
/// describes: its cached metadata is written back when possible, it stays marked dirty, and
/// debug builds print a warning.
// @unchecked Sendable: the metadata state below is only touched with `metaLock` held (or
// before the node is shared, or in `deinit`); the other stored properties are immutable or
// thread-safe themselves (LockedFlag, CloseGate, DirtyBitmapSet, PosixMutex).
public final class Qcow2Node: BlockDriver, @unchecked Sendable {
    /// `qcow2`, as QEMU names the driver.
    public let driverName = "qcow2"
    /// The protocol node holding the image's bytes: a `FileNode`, an NBD client node, or any other node.
    public let hostFile: any BlockDriver
    /// The node holding the image file (QEMU's `file` child).
    public var file: (any BlockDriver)? { hostFile }
    /// The backing node, if the image has one and it was opened.
    public var backing: (any BlockDriver)? { backingNode }
    /// The image file's name.
    public var filename: String { hostFile.filename }
    /// Read-only because its file is, or because a reopen made the format node read-only
    /// over a writable file (``reopenReadOnly()``).
    public var isReadOnly: Bool { formatReadOnly.value || hostFile.isReadOnly }
    /// Set by ``reopenReadOnly()``, cleared by ``reopenReadWrite()``.
    let formatReadOnly = LockedFlag()
    /// Set once a corruption was reported (QEMU's `signaled_corruption`): later non-fatal
    /// reports are not repeated.
    let signaledCorruption = LockedFlag()
    /// Opened with a write-through cache mode (`writethrough`, `directsync`): every write is
    /// made durable with its metadata before it completes, as QEMU does for a backend without
    /// a write cache (each write carries FUA, which this driver serves with a flush).
    let writeThrough = LockedFlag()
    /// 1: guest reads and writes may start at any byte (partial clusters are handled here).
    public var requestAlignment: Int { 1 }
    /// The virtual disk size in bytes (the header's `size`).
    public var length: Int64 { Int64(header.size) }

    /// Cluster size in bytes.
    public var clusterSize: Int { header.clusterSize }
    /// The backing file name exactly as stored in the header.
    public var backingFileName: String? { header.backingFileName }
    /// The backing format from the header extension.
    public var backingFormat: String? { header.backingFormat }
    /// The dirty bit (v3 incompatible feature bit 0).
    public var isDirty: Bool { header.incompatibleFeatures & Qcow2Header.Incompatible.dirty != 0 }
    /// The corrupt bit (v3 incompatible feature bit 1).
    public var isCorrupt: Bool { header.incompatibleFeatures & Qcow2Header.Incompatible.corrupt != 0 }
    /// Number of internal snapshots.
    public var snapshotCount: Int { Int(header.nbSnapshots) }

    /// The format-specific part of `qemu-img info`: compat level, features, refcount width,
    /// compression type and bitmaps.
    public var formatInfo: Qcow2FormatInfo {
        Qcow2FormatInfo(compat: header.version >= 3 ? "1.1" : "0.10",
                        lazyRefcounts: header.compatibleFeatures & Qcow2Header.compatibleLazyRefcounts != 0,
                        refcountBits: header.refcountBits, corrupt: isCorrupt,
                        extendedL2: header.incompatibleFeatures & Qcow2Header.Incompatible.extendedL2 != 0,
                        compressionType: Qcow2CompressionType(rawValue: header.compressionType) ?? .zlib,
                        bitmaps: persistentBitmapInfo)
    }

    // MARK: State (guarded by metaLock unless noted)

    package var header: Qcow2Header
    package var backingNode: (any BlockDriver)?
    package let metaLock = AsyncMutex()
    let clusterBits: Int
    /// Entries per L2 table.
    let l2Entries: Int
    var l1Table: [UInt64]
    package let l2Cache: Qcow2MetadataCache
    /// Whether refcount updates may stay cached while the image is marked dirty (QEMU's
    /// `use_lazy_refcounts`: the header's feature bit, or the `lazy-refcounts` option).
    var useLazyRefcounts: Bool
    /// The runtime options the node was opened or last reopened with.
    public internal(set) var runtimeOptions: Qcow2RuntimeOptions
    /// `pass-discard-request` when the options leave it out: the node's discard mode.
    var discardRequestDefault = true
    package let refcountCache: Qcow2MetadataCache
    var refcountTable: [UInt64]
    /// Refcount entries per refcount block.
    var refcountBlockEntries: Int
    /// Lowest cluster index that may be free.
    var freeClusterIndex: Int64 = 0
    /// Where the next compressed cluster's bytes may go (0: start a new host cluster); see `Qcow2+CompressedWrite.swift`.
    var freeByteOffset: Int64 = 0
    /// One past the highest cluster index ever in use (file end, in clusters).
    var endCluster: Int64
    /// Reference drops that could not be applied when the host file refused a write; retried
    /// at the next flush (`Qcow2+DeferredFree.swift`).
    var pendingFrees: [PendingFree] = []
    /// Guest clusters whose allocation is under way.
    var inflight: [InflightAllocation] = []
    /// The last decompressed cluster (L2 entry → data).
    var decompressedCache: (entry: UInt64, data: AlignedBuffer)?
    let decompressLock = PosixMutex()
    /// Open/closed state and the requests in flight (see ``CloseGate``).
    let gate = CloseGate()
    /// False once ``close()`` has begun: the node refuses new requests (for tests that make a
    /// close race a request at a chosen step).
    package var isOpen: Bool { gate.isOpen }
    /// This session set the dirty bit on disk (``markDirtyBeforeMetadataChange()``), so a
    /// clean close clears it.
    var dirtyMarkedHere = false
    /// The internal snapshots, as read from the snapshot table (`Qcow2+SnapshotTable.swift`).
    var snapshotList: [Qcow2Snapshot] = []
    /// Bytes the snapshot table occupies at `header.snapshotsOffset` (unpadded, as QEMU counts).
    var snapshotTableSize = 0
    /// The persistent dirty bitmaps of the image (`Qcow2+Bitmaps*.swift`): loaded at open,
    /// marked by every write, write-zeroes and discard, stored at close.
    public let persistentBitmaps = DirtyBitmapSet()
    /// The bitmap directory as it is on disk.
    var bitmapDirectory: [Qcow2BitmapEntry] = []
    /// The image had a bitmaps extension without autoclear bit 0 when it was opened: a
    /// program without bitmap support wrote it, so its bitmaps were ignored (and dropped
    /// on a read-write open). Tools print QEMU's warning for it.
    public private(set) var openedWithStaleBitmaps = false

    struct InflightAllocation {
        let firstCluster: Int64
        let count: Int64
        let done: AsyncEvent
    }

    static let l1OffsetMask: UInt64 = 0x00ff_ffff_ffff_fe00
    static let l2OffsetMask: UInt64 = 0x00ff_ffff_ffff_fe00
    static let copied: UInt64 = 1 << 63
    static let compressedFlag: UInt64 = 1 << 62
    static let zeroFlag: UInt64 = 1 << 0

    deinit { droppedWithoutClose() }

    init(file: any BlockDriver, header: Qcow2Header, l1: [UInt64], refcountTable: [UInt64],
         capacities: Qcow2CacheCapacities, lazyRefcounts: Bool, runtimeOptions: Qcow2RuntimeOptions) {
        self.hostFile = file
        self.header = header
        self.clusterBits = Int(header.clusterBits)
        self.l2Entries = header.clusterSize / 8
        self.l1Table = l1
        self.refcountTable = refcountTable
        self.refcountBlockEntries = header.clusterSize * 8 / header.refcountBits
        self.useLazyRefcounts = lazyRefcounts
        self.runtimeOptions = runtimeOptions
        let cs = header.clusterSize
        l2Cache = Qcow2MetadataCache(name: "L2", file: file, tableSize: cs, capacity: capacities.l2)
        refcountCache = Qcow2MetadataCache(name: "refcount", file: file, tableSize: cs, capacity: capacities.refcount)
        let fileClusters = (file.length + Int64(cs) - 1) / Int64(cs)
        endCluster = fileClusters
        let sync: () async throws -> Void = { [unowned file] in try await file.flush() }
        l2Cache.syncFile = sync
        refcountCache.syncFile = sync
    }

    /// Opens the qcow2 image on `file`.
    /// - Parameter openBacking: opens a backing file by name and format (the opener resolves paths).
    public static func open(file: any BlockDriver, options: OpenOptions,
                            openBacking: (String, String?) async throws -> any BlockDriver) async throws -> Qcow2Node {
        let fileLength = file.length
        let headBytes = Int(min(fileLength, Int64(2 << 20)))
        let head = try await file.read(at: 0, count: max(headBytes, 0))
        let prelim = try Qcow2Header.parse(head, fileLength: fileLength)
        let header = try Qcow2Header.parse(Array(head.prefix(prelim.clusterSize)), fileLength: fileLength)
        let cs = Int64(header.clusterSize)

        // Read-only when asked, even over a writable file (a read-only node sharing a file
        // node): such a node never writes, not even the dirty-bit repair or autoclear bits.
        let readOnly = options.readOnly || file.isReadOnly
        if !readOnly && header.incompatibleFeatures & Qcow2Header.Incompatible.corrupt != 0 && !options.forRepair {
            throw BlockError(.corrupt, "qcow2: Image is corrupt; cannot be opened read/write")
        }
        // L1 table.
        let l1Bytes = Int(header.l1Size) * 8
        var l1 = [UInt64](repeating: 0, count: Int(header.l1Size))
        if l1Bytes > 0 {
            let raw = try await file.read(at: Int64(header.l1TableOffset), count: l1Bytes)
            // SAFETY: `raw` was read with `l1.count * 8` bytes; the reads stay inside the closure.
            raw.withUnsafeBytes { b in for i in 0..<l1.count { l1[i] = b.be64(i * 8) } }
        }
        // Refcount table.
        let rtBytes = Int(header.refcountTableClusters) * Int(cs)
        var rt = [UInt64](repeating: 0, count: rtBytes / 8)
        do {
            let raw = try await file.read(at: Int64(header.refcountTableOffset), count: rtBytes)
            // SAFETY: `raw` was read with `rt.count * 8` bytes; the reads stay inside the closure.
            raw.withUnsafeBytes { b in for i in 0..<rt.count { rt[i] = b.be64(i * 8) } }
        }
        // Unaligned refcount block offsets are found when a block is used (QEMU's
        // qcow2_get_refcount), not at open: reads work, refcount updates mark the image corrupt.
        let runtime = options.formatOptions as? Qcow2RuntimeOptions ?? Qcow2RuntimeOptions()
        let capacities = try cacheCapacities(runtime, header: header, legacyL2Bytes: options.l2CacheSize)
        let lazy = try lazyRefcounts(runtime, header: header)
        let node = Qcow2Node(file: file, header: header, l1: l1, refcountTable: rt, capacities: capacities,
                             lazyRefcounts: lazy, runtimeOptions: runtime)
        if readOnly { node.formatReadOnly.set(true) }
        node.discardRequestDefault = options.discardUnmap
        node.writeThrough.set(options.cache.writeThrough)
        try await node.loadSnapshotTable()
        try await node.loadPersistentBitmaps()
        node.openedWithStaleBitmaps = header.autoclearFeatures & Qcow2Header.autoclearBitmaps == 0
            && header.bitmapsExtensionData() != nil
        if let name = header.backingFileName, options.openBacking {
            node.backingNode = try await openBacking(name, header.backingFormat)
        }
        if !readOnly {
            try await node.prepareForWriting(options: options)
        }
        return node
    }

    /// On a read-write open: clear autoclear feature bits this implementation does not
    /// maintain (bit 0, bitmaps, is kept; a bitmaps extension without it is stale, written
    /// by a program without bitmap support, and is dropped as QEMU does), repair after an
    /// unclean shutdown (dirty bit; the check's lines are posted as ``BlockNotice``s), and mark the persistent bitmaps in use.
    func prepareForWriting(options: OpenOptions) async throws {
        let kept = header.autoclearFeatures & Qcow2Header.autoclearBitmaps
        let stale = kept == 0 && header.bitmapsExtensionData() != nil
        if header.autoclearFeatures != kept || stale {
            header.autoclearFeatures = kept
            if stale { header.setBitmapsExtension(nil) }
            try await writeHeader()
        }
        if isDirty && !options.forRepair {
            // QEMU's qcow2_do_open prints its check's lines on stderr as they come.
            let result = try await check(repair: .all)
            for line in result.messages { BlockNotices.post(.repair, line) }
            header.incompatibleFeatures &= ~Qcow2Header.Incompatible.dirty
            try await writeHeader()
            try await hostFile.flush()
        }
        try await markBitmapsInUseLocked()
    }

    /// Writes the header cluster from `header`.
    func writeHeader() async throws {
        var h = header
        let bytes = try h.encode()
        header = h
        var buf = bytes
        buf.append(contentsOf: [UInt8](repeating: 0, count: clusterSize - buf.count))
        try await hostFile.write(at: 0, bytes: buf)
    }

    /// Writes back cached L2 and refcount blocks in dependency order, then flushes the file
    /// (QEMU's `qcow2_co_flush_to_os` plus the file's flush). While the image is marked
    /// dirty (lazy refcounts in use) the refcount blocks stay cached, as QEMU's
    /// `qcow2_write_caches`: the refcounts on disk are not trusted until a clean close, and
    /// the next open rebuilds them; every L2 entry, and so every acknowledged write, is durable.
    /// - Throws: ``BlockError`` `.closed` after ``close()``, or an I/O error.
    public func flush() async throws {
        try await gate.run(filename, "flush") { try await flushAdmitted(lazyRefcounts: true) }
    }

    /// Writes the metadata caches back and flushes the file (``flush()`` without the gate).
    /// - Parameter lazyRefcounts: a guest flush: refcount blocks are left cached while the
    ///   image is marked dirty (``flush()``); false writes them too (close, reopen, amend, shrink).
    func flushAdmitted(lazyRefcounts: Bool = false) async throws {
        if isReadOnly { return }
        try await metaLock.withLock {
            await hostFile.debugEvent(.flushToOS)
            try await retryPendingFrees()
            try await l2Cache.flush()
            if !(lazyRefcounts && isDirty) { try await refcountCache.flush() }
        }
        try await hostFile.flush()
    }

    /// Refuses new requests and waits for those in flight; then stores the persistent
    /// bitmaps, writes the metadata caches back, flushes, clears the dirty bit (when all of
    /// that succeeded) and closes the backing and file nodes. A second close returns once the
    /// first has finished.
    public func close() async throws { try await close(closingFile: true) }

    /// ``close()``, leaving the file node open: it is another node of the graph, closed by
    /// whoever owns it.
    public func closeLeavingFileOpen() async throws { try await close(closingFile: false) }

    private func close(closingFile: Bool) async throws {
        guard await gate.beginClose() else { return }
        defer { gate.finishClose() }
        await gate.drain()
        var firstError: Error?
        if !isReadOnly {
            do { try await metaLock.withLock { try await storeBitmapsLocked() } } catch { firstError = error }
            do { try await flushAdmitted() } catch { if firstError == nil { firstError = error } }
            if firstError == nil {
                do { try await metaLock.withLock { try await markCleanLocked() } } catch { firstError = error }
            }
        }
        if let b = backingNode {
            do { try await b.close() } catch { if firstError == nil { firstError = error } }
        }
        if closingFile { try await hostFile.close() }
        if let e = firstError { throw e }
    }

    /// The error a request that found corrupt metadata fails with: the reason as its message,
    /// and `EIO` as its errno, which the tools print as QEMU's do ("Input/output error"; the
    /// reason reaches them as a notice).
    func corruptError(_ message: String, offset: Int64? = nil) -> BlockError {
        BlockError(.corrupt, message, errno: EIO, path: filename, offset: offset)
    }

    /// Reports corrupt metadata as QEMU's `qcow2_signal_corruption`: on a writable node the
    /// corruption is fatal, the image is marked corrupt on disk (version 3) and a
    /// ``BlockNotice`` "qcow2: Marking image as corrupt: …" is posted; on a read-only node it
    /// is not, and the notice is "qcow2: Image is corrupt: …". After the first notice, later
    /// ones are suppressed, except a fatal one on an image not yet marked corrupt.
    /// - Returns: the error the request fails with (``corruptError(_:offset:)``).
    func signalCorruption(_ message: String, offset: Int64? = nil) async -> BlockError {
        let fatal = !isReadOnly
        let markedCorrupt = isCorrupt
        if !signaledCorruption.value || (fatal && !markedCorrupt) {
            if fatal {
                BlockNotices.post(.corruption, "qcow2: Marking image as corrupt: \(message); further corruption events will be suppressed")
            } else {
                BlockNotices.post(.corruption, "qcow2: Image is corrupt: \(message); further non-fatal corruption events will be suppressed")
            }
            signaledCorruption.set(true)
        }
        if fatal && header.version >= 3 && !markedCorrupt {
            header.incompatibleFeatures |= Qcow2Header.Incompatible.corrupt
            try? await writeHeader()
            try? await hostFile.flush()
        }
        return corruptError(message, offset: offset)
    }
}
