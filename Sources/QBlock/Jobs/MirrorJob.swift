import QBlockBitmaps
import QBlockCore
import QBlockDrivers
import QBlockGraph
/// What a mirror copies first (QAPI's `MirrorSyncMode`, the modes this driver supports).
public enum MirrorSync: String, Sendable, CaseIterable {
    /// The whole disk as the guest sees it.
    case full
    /// What the top image allocates; the target has the source's backing file.
    case top
    /// Only what is written while the job runs.
    case none
}

/// The tunables of a mirror (the arguments of `drive-mirror`/`blockdev-mirror` past the nodes).
public struct MirrorOptions: Sendable {
    /// What to copy (`sync`): the whole disk, the top image, or only new writes.
    public var sync: MirrorSync
    /// Whether guest writes wait for their copy to the target (`copy-mode`).
    public var copyMode: MirrorCopyMode
    /// Bytes per dirty bit (`granularity`); nil: the target's cluster size within 4 KiB...64 KiB, else 64 KiB.
    public var granularity: Int64?
    /// Bytes copied at once at most (`buf-size`), split into requests of up to 1 MiB.
    public var bufSize: Int64
    /// What to do when reading the source fails (`on-source-error`).
    public var onSourceError: BlockdevOnError
    /// What to do when writing the target fails (`on-target-error`).
    public var onTargetError: BlockdevOnError
    /// The target reads as zeros already (a new image): areas the source does not allocate are not copied.
    public var targetIsZeroed: Bool
    /// For an active commit: the node being committed into is the target, and only what
    /// lies above it is copied.
    public var commitBase: (any BlockDriver)?
    /// A persistent dirty bitmap in a side file (extension argument `x-bitmap-file`): a
    /// mirror killed with the process can be finished offline from it.
    public var bitmapFile: String?
    /// The node the target is linked to as its backing file when the job pivots: for
    /// `drive-mirror`, the source's backing node (sync=top) or the source itself
    /// (sync=none). Nil leaves the target's backing link as it is (`blockdev-mirror`, and
    /// sync=full).
    public var targetBacking: (any BlockDriver)?
    /// The node name of the filter the job inserts above the source (`filter-node-name`);
    /// nil: a generated one.
    public var filterNodeName: String?
    /// Whether areas that read as zeros may be deallocated on the target rather than
    /// written as zeros (`unmap`, default true); both read back as zeros.
    public var unmap: Bool = true

    /// Creates mirror options; every parameter is the property of the same name. The
    /// defaults are `drive-mirror`'s: a full background copy, 16 MiB buffer, errors reported.
    public init(sync: MirrorSync = .full, copyMode: MirrorCopyMode = .background, granularity: Int64? = nil,
                bufSize: Int64 = 16 << 20, onSourceError: BlockdevOnError = .report, onTargetError: BlockdevOnError = .report,
                targetIsZeroed: Bool = false, commitBase: (any BlockDriver)? = nil, bitmapFile: String? = nil,
                targetBacking: (any BlockDriver)? = nil) {
        self.sync = sync
        self.copyMode = copyMode
        self.granularity = granularity
        self.bufSize = bufSize
        self.onSourceError = onSourceError
        self.onTargetError = onTargetError
        self.targetIsZeroed = targetIsZeroed
        self.commitBase = commitBase
        self.bitmapFile = bitmapFile
        self.targetBacking = targetBacking
    }
}

/// `drive-mirror`, `blockdev-mirror` and the active `block-commit` (QEMU's `block/mirror.c`).
///
/// The job inserts a ``MirrorTopNode`` above the source and switches the source's users to
/// it, copies every dirty area of its bitmap (several requests in flight, rate limited),
/// reports `ready` once source and target match, then keeps copying what writers dirty.
/// `block-job-complete` drains the users, copies the last dirty areas and switches every
/// user to the target; a cancel after `ready` leaves a consistent copy without switching.
// @unchecked: `shouldComplete`, `bytesInFlight`, `filterNode`, `sideFile` and `persistentBitmap`
// are only touched with `lock` held; the lets are immutable or thread-safe (RangeLock,
// DirtyBitmap, BlockGraph).
public final class MirrorJob: CompletableJobDriver, FinalizingJobDriver, @unchecked Sendable {
    /// ``JobType/mirror``, or ``JobType/commit`` for an active commit.
    public let jobType: JobType
    /// The node being copied (QEMU's `mirror_top_bs` sits above it while the job runs).
    public let sourceNode: BlockNode
    /// The node the copy is written to; users are switched to it on completion.
    public let targetNode: BlockNode
    let graph: BlockGraph
    let options: MirrorOptions
    let granularity: Int64
    /// The job's dirty bitmap (granularity-sized bits over the source).
    public let bitmap: DirtyBitmap
    let ranges = RangeLock()
    /// Every write to the target covers whole units of this many bytes (a multiple of the
    /// granularity): the granularity, or the target's cluster size when that is larger, so
    /// the target never fills the rest of a cluster from a backing file that may not be
    /// linked yet or may not match the source there. The bytes come from the source.
    let copyAlign: Int64
    /// Bytes per copy request.
    let chunk: Int64
    let maxInFlight: Int
    let lock = PosixMutex()
    var shouldComplete = false
    var bytesInFlight: Int64 = 0
    var filterNode: BlockNode?
    var sideFile: BitmapSideFile?
    /// The bits the side file holds (see ``MirrorTopNode/persistent``).
    var persistentBitmap: DirtyBitmap?

    /// - Parameters:
    ///   - source: the node to copy (its users are switched to the mirror's filter while the job runs).
    ///   - target: the node to copy into, of the same size.
    ///   - graph: the graph holding `source` and its users.
    ///   - type: `.mirror`, or `.commit` for an active commit.
    /// - Throws: ``BlockError`` when the sizes differ or the granularity is invalid.
    public init(source: BlockNode, target: BlockNode, graph: BlockGraph, options: MirrorOptions = MirrorOptions(),
                type: JobType = .mirror) throws {
        guard source.length == target.length else {
            throw BlockError(.invalidArgument, "Source and target image have different sizes", operation: "mirror")
        }
        if let g = options.granularity, g < 512 || g > (64 << 20) || g & (g - 1) != 0 {
            throw BlockError(.invalidArgument, "Granularity must be power of 2 between 512 and 64M", operation: "mirror")
        }
        if let g = options.granularity, options.bufSize < g {
            throw BlockError(.invalidArgument, "Parameter 'buf-size' must be greater than or equal to the granularity", operation: "mirror")
        }
        let cluster = target.formatClusterSize.map(Int64.init)
        granularity = options.granularity ?? min(65536, max(4096, cluster ?? 65536))
        bitmap = try DirtyBitmap(name: "", size: source.length, granularity: granularity)
        // Both are powers of two, so the larger is a multiple of the smaller.
        copyAlign = max(granularity, cluster ?? granularity)
        chunk = max(copyAlign, min(1 << 20, options.bufSize) / copyAlign * copyAlign)
        maxInFlight = max(1, Int(options.bufSize / chunk))
        if options.targetBacking != nil, options.commitBase == nil,
           !(target.skippingFilters.innermostDriver is any BackingLinked) {
            throw BlockError(.unsupported, "Target '\(target.nodeName)' (\(target.driverName)) cannot take a backing file",
                             operation: "mirror")
        }
        sourceNode = source
        targetNode = target
        self.graph = graph
        self.options = options
        jobType = type
    }

    package func complete(_ job: Job) throws {
        lock.withLock { shouldComplete = true }
    }

    /// A soft cancel of a ready mirror completes it without switching to the target.
    package func cancel(_ job: Job, force: Bool) -> Bool { force || !job.isReady }

    package func run(_ job: Job) async throws {
        if let path = options.bitmapFile {
            let persisted = try DirtyBitmap(name: "", size: bitmap.size, granularity: granularity)
            let side = try await BitmapSideFile.open(path: path, bitmap: persisted)
            // A file left by an earlier mirror: what it marks is still to copy.
            try bitmap.merge(from: persisted)
            lock.withLock {
                sideFile = side
                persistentBitmap = persisted
            }
        }
        // The filter first, so that no write between the initial scan and the switch is missed.
        try await insertFilter(job)
        try await markInitial()
        if let side = lock.withLock({ sideFile }), let persisted = lock.withLock({ persistentBitmap }) {
            try persisted.merge(from: bitmap)
            _ = try await side.syncNewlyDirty()
        }
        try await copyLoop(job)
    }

    /// Marks what must be copied before the first write arrives.
    func markInitial() async throws {
        let length = sourceNode.length
        if options.sync == .none { return }
        if options.sync == .full && !options.targetIsZeroed && options.commitBase == nil {
            bitmap.markAll()
            return
        }
        let base: (any BlockDriver)? = options.commitBase ?? (options.sync == .top ? sourceNode.backing : nil)
        var offset: Int64 = 0
        while offset < length {
            let st = try await ChainStatus.isAllocatedAbove(sourceNode, base: base, at: offset, length: length - offset)
            if st.allocated { bitmap.mark(offset: offset, length: st.length) }
            offset += st.length
        }
    }

    /// Puts the filter above the source for every user.
    func insertFilter(_ job: Job) async throws {
        let side = lock.withLock { sideFile }
        let top = MirrorTopNode(source: sourceNode, target: targetNode, bitmap: bitmap, align: copyAlign,
                                persistent: lock.withLock { persistentBitmap }, ranges: ranges,
                                mode: options.copyMode, sideFile: side, onDirty: { [weak job] in job?.wake() })
        let node = BlockNode(nodeName: options.filterNodeName ?? graph.generateNodeName(), driver: top)
        try await graph.drained {
            try graph.add(node)
            graph.replace(sourceNode, with: node)
        }
        lock.withLock { filterNode = node }
    }

    func copyLoop(_ job: Job) async throws {
        try await withThrowingTaskGroup(of: Void.self) { group in
            var inFlight = 0
            var cursor: Int64 = 0
            var lastPersist = SystemJobClock().now()
            while true {
                if job.isCancelled { break }
                await job.pausePoint()
                let dirty = bitmap.dirtyBytes
                let done = job.progress.current
                job.setProgressTotal(done + UInt64(dirty) + UInt64(lock.withLock { bytesInFlight }))
                if dirty > 0 && inFlight < maxInFlight {
                    if let area = nextDirty(from: cursor) ?? nextDirty(from: 0) {
                        cursor = area.offset + area.length
                        bitmap.reset(offset: area.offset, length: area.length)
                        lock.withLock { bytesInFlight += area.length }
                        inFlight += 1
                        group.addTask { try await self.copy(area, job) }
                        await job.rateLimit(area.length)
                        continue
                    }
                }
                if inFlight > 0 {
                    try await group.next()
                    inFlight -= 1
                    if SystemJobClock().now() - lastPersist > 1_000_000_000 && inFlight == 0 {
                        try await persist()
                        lastPersist = SystemJobClock().now()
                    }
                    continue
                }
                // In sync: nothing dirty, nothing in flight. Before announcing ready the
                // target is flushed (as QEMU's mirror does), so that completing is quick.
                if !job.isReady {
                    do { try await targetNode.flush() } catch {
                        if job.errorAction(for: error, isRead: false, policy: options.onTargetError) == .report { throw error }
                        continue
                    }
                }
                if !job.isReady || SystemJobClock().now() - lastPersist > 1_000_000_000 {
                    try await persist()
                    lastPersist = SystemJobClock().now()
                }
                if !job.isReady { job.transitionToReady() }
                if lock.withLock({ shouldComplete }) || job.isCancelRequested { break }
                await job.yield()
            }
            try await group.waitForAll()
        }
    }

    /// The first dirty area at or after `offset`, widened to whole copy units and at most
    /// one request long.
    func nextDirty(from offset: Int64) -> (offset: Int64, length: Int64)? {
        guard let a = bitmap.nextDirtyArea(from: offset) else { return nil }
        let start = a.offset / copyAlign * copyAlign
        let wanted = a.offset + min(a.length, chunk)
        let end = min(sourceNode.length, start + chunk, (wanted + copyAlign - 1) / copyAlign * copyAlign)
        return (start, end - start)
    }

    /// Copies one dirty area (its bits already reset) from the source to the target.
    func copy(_ area: (offset: Int64, length: Int64), _ job: Job) async throws {
        defer { lock.withLock { bytesInFlight -= area.length } }
        try await ranges.withRange(area.offset, area.offset + area.length) {
            let buf = AlignedBuffer(count: Int(area.length))
            var isRead = true
            do {
                try await buf.withUnsafeMutableBytes { b in
                    try await sourceNode.read(at: area.offset, into: b)
                    isRead = false
                    if b.allSatisfy({ $0 == 0 }) {
                        try await targetNode.writeZeroes(at: area.offset, length: area.length,
                                                         flags: options.unmap ? [.mayUnmap] : [])
                    } else {
                        try await targetNode.write(at: area.offset, from: UnsafeRawBufferPointer(b), flags: [])
                    }
                }
                job.progressDone(UInt64(area.length))
            } catch {
                bitmap.mark(offset: area.offset, length: area.length)
                let policy = isRead ? options.onSourceError : options.onTargetError
                if job.errorAction(for: error, isRead: isRead, policy: policy) == .report { throw error }
            }
        }
    }
}
