import Synchronization
import QBlockCore
import QBlockJobs

/// How far a job got, in bytes (the figures of `query-jobs`; the total can grow while a
/// mirror copies what writers dirty).
public struct JobProgress: Sendable, Hashable {
    /// Bytes done.
    public var completed: Int64
    /// Bytes to do in all (done included), as far as the job knows now.
    public var total: Int64

    /// `completed / total`, 0 while the total is unknown.
    public var fraction: Double { total > 0 ? Double(completed) / Double(total) : 0 }
}

/// What cancelling a job does.
public enum JobCancelMode: Sendable, Hashable {
    /// Stop as soon as possible and undo: the disk stays on its current images, a mirror's
    /// target is left incomplete. The job ends with a `.cancelled` error.
    case abort
    /// For a mirror (or an active commit) that is ready: copy the last writes and finish
    /// without switching the disk to the target, leaving a consistent copy behind (QEMU's
    /// `block-job-cancel` without `force`). The job ends without error. Before the job is
    /// ready this is ``abort``.
    case keepCopy
}

/// A running live operation of a ``LiveDisk`` — a stream, a commit or a mirror.
///
/// ```swift
/// let mirror = try await disk.mirror(to: "copy.qcow2")
/// try await mirror.ready()        // throws if the mirror fails first
/// try mirror.complete()           // switch the disk to the copy
/// try await mirror.finished()     // throws the job's error, if any
/// ```
///
/// The handle's ``events`` replay everything the job reported since it was created, so a
/// late reader misses nothing. When ``finished()`` returns, the disk has also let go of
/// the images the job took out of its chain.
public final class BlockJobHandle: Sendable {
    /// The job's ID (unique in its disk).
    public let id: String
    /// What the job does: `.stream`, `.commit` or `.mirror`.
    public let kind: JobType
    /// Whether the job becomes ready and then waits for ``complete()`` (a mirror and an
    /// active commit do; a stream and an intermediate commit just finish).
    public let hasReadyPhase: Bool
    let job: Job
    let log: JobEventLog
    /// The job's end as the disk sees it: the job concluded and the disk settled its chain.
    let settled: Task<Void, Never>

    init(id: String, kind: JobType, hasReadyPhase: Bool, job: Job, log: JobEventLog, settled: Task<Void, Never>) {
        self.id = id
        self.kind = kind
        self.hasReadyPhase = hasReadyPhase
        self.job = job
        self.log = log
        self.settled = settled
    }

    // MARK: Observing

    /// The job's current status.
    public var status: JobStatus { job.status }

    /// Bytes done and to do.
    public var progress: JobProgress {
        let p = job.progress
        return JobProgress(completed: Int64(clamping: p.current), total: Int64(clamping: p.total))
    }

    /// Why the job failed, once it has (nil while it runs and after a success).
    public var failure: BlockError? { job.failure }

    /// Everything the job reports, from its creation on, as typed values; the sequence ends
    /// after the job's last status change.
    public var events: BlockJobEvents { BlockJobEvents(log: log) }

    // MARK: Waiting

    /// Waits until the job is ready (source and target in sync; the job keeps them so until
    /// ``complete()``).
    /// - Throws: the job's error if it fails or is cancelled before it is ready (once the
    ///   disk has undone what the job set up); `.unsupported` for a job without a ready
    ///   phase (see ``hasReadyPhase``).
    public func ready() async throws(BlockError) {
        guard hasReadyPhase else {
            throw BlockError(.unsupported, "Job '\(id)' (\(kind.rawValue)) has no ready phase: wait for finished()",
                             operation: "ready")
        }
        let reached = await job.wait { $0 == .ready || $0 == .standby || !JobStateMachine.canReach(.ready, from: $0) }
        if reached == .ready || reached == .standby { return }
        try await finished()
        throw BlockError(.invalidArgument, "Job '\(id)' finished without becoming ready", operation: "ready")
    }

    /// Waits until the job has ended and the disk has settled its chain (closing the images
    /// the job took out of it).
    /// - Throws: the job's error: `.cancelled` after ``cancel(_:)`` with ``JobCancelMode/abort``,
    ///   else what made it fail.
    public func finished() async throws(BlockError) {
        await settled.value
        if let failure = job.failure { throw failure }
    }

    // MARK: Verbs

    /// Completes a ready job: a mirror switches the disk to its target, an active commit to
    /// the base. Returns at once; ``finished()`` tells when the switch is done.
    /// - Throws: ``BlockError`` if the job is not ready or has no ready phase.
    public func complete() throws(BlockError) {
        try translatingErrors { try job.complete() }
    }

    /// Cancels the job.
    /// - Parameter mode: ``JobCancelMode/abort`` (default) or, for a ready mirror,
    ///   ``JobCancelMode/keepCopy``.
    /// - Throws: ``BlockError`` if the job has already ended.
    public func cancel(_ mode: JobCancelMode = .abort) throws(BlockError) {
        try translatingErrors { try job.cancel(force: mode == .abort) }
    }

    /// Pauses the job at its next pause point (a ready job keeps its target in sync only
    /// once resumed).
    /// - Throws: ``BlockError`` if the job is already paused or has ended.
    public func pause() throws(BlockError) {
        try translatingErrors { try job.pause() }
    }

    /// Resumes a job paused by ``pause()`` (or stopped by an I/O error under a `stop` policy).
    /// - Throws: ``BlockError`` if the job was not paused.
    public func resume() throws(BlockError) {
        try translatingErrors { try job.resume() }
    }

    /// Limits the job's copying to `bytesPerSecond` (0: no limit).
    /// - Throws: ``BlockError`` for a negative rate, or if the job has ended.
    public func setSpeed(bytesPerSecond: Int64) throws(BlockError) {
        guard bytesPerSecond >= 0 else {
            throw BlockError(.invalidArgument, "Speed must not be negative", operation: "set-speed")
        }
        try translatingErrors { try job.setSpeed(UInt64(bytesPerSecond)) }
    }
}

/// The events of one job as an `AsyncSequence` (see ``BlockJobHandle/events``). Each
/// iteration starts at the job's first event; iterations are independent.
public struct BlockJobEvents: AsyncSequence, Sendable {
    /// The events are typed values.
    public typealias Element = BlockJobEvent
    let log: JobEventLog

    /// Makes an iterator starting at the job's first event.
    public func makeAsyncIterator() -> AsyncIterator { AsyncIterator(log: log) }

    /// Iterates over a job's events; `next()` waits for the next one and returns nil after
    /// the last one, or when the task is cancelled.
    public struct AsyncIterator: AsyncIteratorProtocol {
        let log: JobEventLog
        var index = 0

        /// The next event, waiting for it if need be; nil at the end.
        public mutating func next() async -> BlockJobEvent? {
            guard let e = await log.event(at: index) else { return nil }
            index += 1
            return e
        }
    }
}

/// Every event of one job, kept from its creation so that any number of readers see all
/// of them in order.
final class JobEventLog: Sendable {
    private struct State {
        var events: [BlockJobEvent] = []
        var ended = false
        var waiters: [UInt64: CheckedContinuation<Void, Never>] = [:]
        var nextWaiter: UInt64 = 0
    }
    private let state = Mutex(State())

    /// Records `event` and wakes the readers; the job's final status (`null`) ends the log.
    func append(_ event: BlockJobEvent) {
        let wake = state.withLock { s -> [CheckedContinuation<Void, Never>] in
            s.events.append(event)
            if case .statusChanged(.null) = event { s.ended = true }
            defer { s.waiters.removeAll() }
            return Array(s.waiters.values)
        }
        for c in wake { c.resume() }
    }

    /// Ends the log (a job discarded before it started).
    func finish() {
        let wake = state.withLock { s -> [CheckedContinuation<Void, Never>] in
            s.ended = true
            defer { s.waiters.removeAll() }
            return Array(s.waiters.values)
        }
        for c in wake { c.resume() }
    }

    /// The recorded events so far.
    var snapshot: [BlockJobEvent] { state.withLock { $0.events } }

    /// Event number `index`, waiting until it exists; nil once the log ended before it, or
    /// when the task is cancelled.
    func event(at index: Int) async -> BlockJobEvent? {
        while true {
            let now: BlockJobEvent?? = state.withLock { s in
                if index < s.events.count { return .some(s.events[index]) }
                return s.ended ? .some(nil) : nil
            }
            if let now { return now }
            if Task.isCancelled { return nil }
            let id = state.withLock { s -> UInt64 in
                s.nextWaiter += 1
                return s.nextWaiter
            }
            await withTaskCancellationHandler {
                await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
                    let resumeNow = state.withLock { s -> Bool in
                        if index < s.events.count || s.ended || Task.isCancelled { return true }
                        s.waiters[id] = c
                        return false
                    }
                    if resumeNow { c.resume() }
                }
            } onCancel: {
                let c = state.withLock { $0.waiters.removeValue(forKey: id) }
                c?.resume()
            }
        }
    }
}
