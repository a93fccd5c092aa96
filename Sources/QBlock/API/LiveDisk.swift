import Synchronization
#if canImport(Glibc)
import Glibc
#endif
import QBlockCore
import QBlockGraph
import QBlockJobs
import QBlockOpen

/// A disk in use: an image chain opened read-write, a guest-style user of it (``active``),
/// and the live operations QEMU runs on such a disk — external snapshots, stream, commit
/// and mirror — while that user keeps reading and writing.
///
/// ```swift
/// try await LiveDisk.withOpened("vm.qcow2") { disk in
///     try await disk.active.write(bytes, at: 0)            // the guest's I/O
///     try await disk.snapshot(to: "vm-snap1.qcow2")         // vm.qcow2 becomes a read-only backing image
///     let mirror = try await disk.mirror(to: "copy.qcow2")
///     try await mirror.ready()
///     try mirror.complete()                                 // the guest now writes to copy.qcow2
///     try await mirror.finished()
/// }
/// ```
///
/// The disk owns every image it opens: when the closure ends, running jobs are cancelled,
/// and the chain is flushed and closed. Images an operation takes out of the chain (a
/// mirror's old source, streamed or committed images) are closed when that operation ends.
///
/// One live operation runs at a time (as QEMU's block-job blockers allow on one device):
/// starting another while a job runs fails with `.busy`.
public final class LiveDisk: Sendable {
    let graph = BlockGraph()
    let jobs = JobManager()
    let backend: BlockBackend
    /// The host cache mode of every image the disk opens.
    public let cache: CacheMode
    /// The disk as its user sees it: reads and writes go to the current top of the chain,
    /// and follow it across snapshots and mirror switches. Closed with the disk.
    public let active: Image
    /// Serializes the start of operations and closing.
    let operations = AsyncMutex()

    struct State {
        var closed = false
        var jobCounter = 0
        var handles: [BlockJobHandle] = []
        /// A job was started and its end not yet settled.
        var busy = false
    }
    let state = Mutex(State())

    private init(top: BlockNode, cache: CacheMode) throws {
        try graph.add(top)
        backend = BlockBackend(node: top)
        graph.attach(backend)
        self.cache = cache
        active = Image(backend: backend, owned: nil)
    }

    /// Opens the image chain at `path` read-write, lends the disk to `body`, and closes it on
    /// every way out (cancelling jobs that still run).
    ///
    /// - Parameters:
    ///   - path: the top image (its backing chain is opened read-only below it).
    ///   - format: its format, or ``FormatChoice/probe``.
    ///   - cache: the host cache mode for every image of the chain and every image the disk
    ///     creates later.
    ///   - body: what to do with the disk; its result is returned.
    /// - Returns: what `body` returned.
    /// - Throws: ``BlockError`` if the chain cannot be opened or closed, or whatever `body`
    ///   threw (the disk is still closed first).
    public static func withOpened<R>(
        _ path: String, format: FormatChoice = .probe, cache: CacheMode = .writeback,
        isolation: isolated (any Actor)? = #isolation,
        _ body: (LiveDisk) async throws -> R
    ) async throws -> R {
        let options = OpenOptions(format: format.format?.rawValue, readOnly: false, cache: cache)
        let driver = try await translatingErrors { try await ImageOpener.open(path, options: options) }
        let disk: LiveDisk
        do {
            disk = try LiveDisk(top: BlockNode(nodeName: "disk", driver: driver), cache: cache)
        } catch {
            try? await driver.close()
            throw error.asBlockError
        }
        let result: R
        do {
            result = try await body(disk)
        } catch {
            try? await disk.close()
            throw error
        }
        try await disk.close()
        return result
    }

    /// The chain the user sees now: top first.
    /// - Throws: ``BlockError`` `.closed` after the disk's scope ended.
    public var info: ImageDescription {
        get throws(BlockError) { try active.info }
    }

    /// Cancels running jobs, waits for them to end, then flushes and closes the chain.
    func close() async throws(BlockError) {
        await operations.lock()
        defer { operations.unlock() }
        let handles: [BlockJobHandle]? = state.withLock { s in
            if s.closed { return nil }
            s.closed = true
            return s.handles
        }
        guard let handles else { return }
        for h in handles {
            try? h.job.cancel(force: true)
            await h.settled.value
        }
        // Refuses new guest requests and waits for those in flight.
        active.markClosed()
        await backend.drainBegin()
        backend.drainEnd()
        graph.detach(backend)
        let top = backend.node
        graph.forget(top)
        try await translatingErrors { try await top.close() }
    }

    // MARK: Running operations

    /// Runs `body` as the only operation starting now, on an open disk with no job running.
    func exclusive<R>(_ operation: String, _ body: () async throws -> R) async throws(BlockError) -> R {
        await operations.lock()
        defer { operations.unlock() }
        let refusal: BlockError? = state.withLock { s in
            if s.closed { return BlockError(.closed, "The disk was closed", operation: operation) }
            if s.busy { return BlockError(.busy, "A job is running on the disk", operation: operation) }
            return nil
        }
        if let refusal { throw refusal }
        return try await translatingErrors(body)
    }

    /// The node the user's requests go to (the top of the chain when no job runs).
    var top: BlockNode { backend.node }

    /// The node of the chain below `node` (itself included) whose image is the file `path`.
    /// - Throws: ``BlockError`` `.notFound` when the chain has no such image.
    func chainNode(_ path: String, in node: any BlockDriver, excludingTop: Bool) throws -> any BlockDriver {
        let want = Self.canonical(path)
        let chain = excludingTop ? Array(node.backingChain.dropFirst()) : node.backingChain
        guard let found = chain.first(where: { Self.canonical($0.skippingFilters.innermostDriver.filename) == want }) else {
            throw BlockError(.notFound, "'\(path)' is not \(excludingTop ? "below" : "in") the chain of '\(node.filename)'",
                             path: path, operation: "chain")
        }
        return found
    }

    static func canonical(_ path: String) -> String {
        guard let p = realpath(path, nil) else { return path }
        defer { free(p) }
        return String(cString: p)
    }

    /// Starts a job with `start` — a library operation, given the job's options (its ID
    /// here) and the observer of its events — and returns its handle. The `settle` closure
    /// `start` returns with the job runs once the job has concluded, before
    /// ``BlockJobHandle/finished()`` returns. Call inside ``exclusive(_:_:)``.
    func launch(kind: JobType, hasReadyPhase: Bool,
                _ start: (JobOptions, @escaping @Sendable (BlockJobEvent) -> Void) async throws
                    -> (job: Job, settle: @Sendable () async -> Void)) async throws -> BlockJobHandle {
        let id: String = state.withLock { s in
            defer { s.jobCounter += 1 }
            return "\(kind.rawValue)\(s.jobCounter)"
        }
        let log = JobEventLog()
        let started: (job: Job, settle: @Sendable () async -> Void)
        do {
            started = try await start(JobOptions(id: id), { log.append($0) })
        } catch {
            log.finish()
            throw error
        }
        let job = started.job
        // No other operation starts before this one returns (``exclusive(_:_:)``), so the
        // disk is busy before anyone can ask, even if the job has already ended.
        state.withLock { $0.busy = true }
        let settled = Task { [self] in
            await job.waitConcluded()
            await started.settle()
            state.withLock { $0.busy = false }
        }
        let handle = BlockJobHandle(id: id, kind: kind, hasReadyPhase: hasReadyPhase, job: job, log: log, settled: settled)
        state.withLock { $0.handles.append(handle) }
        return handle
    }

    /// Closes `old`, an image chain the user no longer sees, down to (not including) the
    /// first image that is still in the user's chain, which it unlinks from first.
    func retire(_ old: any BlockDriver) async {
        var live = Set<ObjectIdentifier>()
        var cur: (any BlockDriver)? = top
        while let c = cur?.skippingFilters {
            live.insert(ObjectIdentifier(c.innermostDriver))
            cur = c.backing
        }
        var above: (any BlockDriver)?
        cur = old
        while let c = cur?.skippingFilters {
            if live.contains(ObjectIdentifier(c.innermostDriver)) {
                // Still in use: `old` itself (nothing to close), or the rest of the chain.
                guard let above else { return }
                (above.innermostDriver as? any BackingLinked)?.setBackingNode(nil)
                break
            }
            above = c
            cur = c.backing
        }
        if let node = old as? BlockNode { graph.forget(node) }
        try? await old.close()
    }
}
