import QBlockCore
/// The registry of jobs (QEMU's job list): creates and starts jobs, finds them by ID,
/// and hands every job's events, as typed ``JobNotification``s, to its subscribers (the
/// QMP monitor maps them to QMP events).
// @unchecked: `jobs`, `sinks`, `nextSinkID` and `reserved` are only touched with `lock` held.
public final class JobManager: @unchecked Sendable {
    private let lock = PosixMutex()
    private var jobs: [Job] = []
    private var sinks: [(id: Int, sink: @Sendable (JobNotification) -> Void)] = []
    private var nextSinkID = 0
    private var reserved: Set<String> = []

    /// Creates a manager with no jobs and no subscribers.
    public init() {}

    /// Adds an event subscriber: it receives every event of every job, in each job's order;
    /// returns a token for ``unsubscribe(_:)``.
    @discardableResult
    public func subscribe(_ sink: @escaping @Sendable (JobNotification) -> Void) -> Int {
        lock.withLock {
            nextSinkID += 1
            sinks.append((nextSinkID, sink))
            return nextSinkID
        }
    }

    /// Removes a subscriber.
    public func unsubscribe(_ token: Int) {
        lock.withLock { sinks.removeAll { $0.id == token } }
    }

    func emit(_ notification: JobNotification) {
        for s in lock.withLock({ sinks }) { s.sink(notification) }
    }

    /// The jobs, oldest first (dismissed jobs are gone).
    public var all: [Job] { lock.withLock { jobs } }

    /// The job with ID `id`.
    public func job(_ id: String) -> Job? { lock.withLock { jobs.first { $0.id == id } } }

    /// The job with ID `id`, or QEMU's error for a missing one.
    /// - Throws: ``BlockError`` "Job 'ID' not found" (QMP class DeviceNotActive for block jobs).
    public func find(_ id: String) throws -> Job {
        guard let j = job(id) else { throw BlockError(.notFound, "Job '\(id)' not found", operation: "job") }
        return j
    }

    /// Whether `id` is a well-formed QEMU ID: a letter, then letters, digits, '-', '.', '_'.
    public static func isWellFormed(_ id: String) -> Bool {
        guard let first = id.unicodeScalars.first, first.isASCIILetter else { return false }
        return id.unicodeScalars.allSatisfy { $0.isASCIILetter || ("0"..."9").contains($0) || $0 == "-" || $0 == "." || $0 == "_" }
    }

    /// Registers a job driven by `driver` and starts it.
    /// - Parameter observe: receives the job's events as typed values, from the first on.
    /// - Throws: ``BlockError`` "Invalid job ID 'X'" or "Job ID 'X' already in use".
    @discardableResult
    package func start(_ driver: any JobDriver, options: JobOptions,
                       observe: (@Sendable (BlockJobEvent) -> Void)? = nil) throws -> Job {
        let job = try create(driver, options: options, observe: observe)
        job.start()
        return job
    }

    /// Registers a job without starting it (the caller finishes its setup, then calls
    /// ``Job/start()`` through ``start(_:)``).
    package func create(_ driver: any JobDriver, options: JobOptions,
                observe: (@Sendable (BlockJobEvent) -> Void)? = nil) throws -> Job {
        guard Self.isWellFormed(options.id) else {
            throw BlockError(.invalidArgument, "Invalid job ID '\(options.id)'", operation: "job")
        }
        let inUse = BlockError(.invalidArgument, "Job ID '\(options.id)' already in use", operation: "job")
        try lock.withLock {
            if jobs.contains(where: { $0.id == options.id }) || reserved.contains(options.id) { throw inUse }
            reserved.insert(options.id)
        }
        let job = Job(options: options, driver: driver, emit: { [weak self] in self?.emit($0) },
                      observe: observe, onDismiss: { [weak self] j in self?.remove(j) })
        lock.withLock {
            reserved.remove(options.id)
            jobs.append(job)
        }
        return job
    }

    /// Starts a job made by ``create(_:options:)``.
    package func start(_ job: Job) { job.start() }

    /// Drops a job that was created but could not be started (its setup failed).
    package func discard(_ job: Job) { remove(job) }

    private func remove(_ job: Job) {
        lock.withLock { jobs.removeAll { $0 === job } }
    }
}

extension Unicode.Scalar {
    var isASCIILetter: Bool { ("a"..."z").contains(self) || ("A"..."Z").contains(self) }
}

/// What `query-jobs` reports for one job (QAPI's `JobInfo`; the monitor makes its QMP form).
public struct JobInfo: Sendable, Equatable {
    /// The job ID (`id`).
    public var id: String
    /// The job's kind (`type`: `stream`, `commit`, `mirror`, …).
    public var type: JobType
    /// Where the job is in its life cycle (`status`).
    public var status: JobStatus
    /// Progress so far, in the job's units (bytes for block jobs) (`current-progress`).
    public var currentProgress: UInt64
    /// The progress at which the job will be done; may grow while it runs (`total-progress`).
    public var totalProgress: UInt64
    /// Why the job failed, once it concluded with an error (`error`).
    public var error: String?
}

/// What `query-block-jobs` reports for one job (QAPI's `BlockJobInfo`; the monitor makes its QMP form).
public struct BlockJobInfo: Sendable, Equatable {
    /// The job's kind (`type`).
    public var type: JobType
    /// The job ID; QEMU calls it `device` here for historical reasons.
    public var device: String
    /// Bytes the job expects to process (`len`); may grow while it runs.
    public var len: UInt64
    /// Bytes processed so far (`offset`).
    public var offset: UInt64
    /// The job's coroutine is doing work rather than sleeping or waiting (`busy`).
    public var busy: Bool
    /// A user paused the job (`paused`).
    public var paused: Bool
    /// The rate limit in bytes per second; 0 is unlimited (`speed`).
    public var speed: UInt64
    /// Whether the job stopped on an I/O error (`io-status`).
    public var ioStatus: BlockIOStatus
    /// The job reached the ready phase and may be completed (`ready`).
    public var ready: Bool
    /// Where the job is in its life cycle (`status`).
    public var status: JobStatus
    /// Whether the job finalizes without `job-finalize` (`auto-finalize`).
    public var autoFinalize: Bool
    /// Whether the job disappears without `job-dismiss` (`auto-dismiss`).
    public var autoDismiss: Bool
    /// Why the job failed, once it concluded with an error (`error`).
    public var error: String?
}

extension Job {
    /// This job as `query-jobs` shows it.
    public var info: JobInfo {
        lock.withLock {
            JobInfo(id: id, type: type, status: sm.status, currentProgress: progressCurrent,
                    totalProgress: progressTotal, error: errorMessage)
        }
    }

    /// This job as `query-block-jobs` shows it.
    public var blockInfo: BlockJobInfo {
        lock.withLock {
            BlockJobInfo(type: type, device: id, len: progressTotal, offset: progressCurrent, busy: busy,
                         paused: pauseCount > 0, speed: bucket.rate, ioStatus: ioStatus, ready: sm.isReady,
                         status: sm.status, autoFinalize: autoFinalize, autoDismiss: autoDismiss, error: errorMessage)
        }
    }
}
