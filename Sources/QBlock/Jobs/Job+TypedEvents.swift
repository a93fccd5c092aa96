import QBlockCore
/// What a job reports as it runs. The jobs layer produces only these typed values; the QMP
/// monitor turns each into its QEMU event (`JOB_STATUS_CHANGE`, `BLOCK_JOB_READY`,
/// `BLOCK_JOB_ERROR`, `BLOCK_JOB_PENDING`, `BLOCK_JOB_COMPLETED`, `BLOCK_JOB_CANCELLED`),
/// named beside each case.
///
/// A job produces these in the order QMP clients see its events; ``BlockJobHandle/events``
/// delivers them as an `AsyncSequence`, and ``JobManager/subscribe(_:)`` as
/// ``JobNotification``s.
public enum BlockJobEvent: Sendable, CustomStringConvertible {
    /// The job moved to a new status (`JOB_STATUS_CHANGE`).
    case statusChanged(JobStatus)
    /// Source and target are in sync; the job waits for ``BlockJobHandle/complete()``
    /// (`BLOCK_JOB_READY`).
    case ready
    /// An I/O error hit the job and its error policy chose `action` (`BLOCK_JOB_ERROR`).
    case ioError(BlockJobIOError)
    /// The job's work is done and it waits to be finalized (`BLOCK_JOB_PENDING`; only for
    /// jobs that do not finalize themselves).
    case pending
    /// The job ended: `nil` when it succeeded, else why it failed (`BLOCK_JOB_COMPLETED`,
    /// which QMP sends for block jobs only).
    case completed(BlockError?)
    /// The job was cancelled before it finished (`BLOCK_JOB_CANCELLED`, block jobs only).
    case cancelled

    /// A short text for logs: `status(running)`, `ready`, `completed(error: …)`, ….
    public var description: String {
        switch self {
        case .statusChanged(let s): return "status(\(s.rawValue))"
        case .ready: return "ready"
        case .ioError(let e): return "ioError(\(e.isRead ? "read" : "write"), \(e.action.rawValue))"
        case .pending: return "pending"
        case .completed(nil): return "completed"
        case .completed(let e?): return "completed(error: \(e.message))"
        case .cancelled: return "cancelled"
        }
    }
}

/// An I/O error a job met, and what its error policy did about it.
public struct BlockJobIOError: Sendable, Hashable {
    /// True if reading (the source) failed, false if writing (the target) failed.
    public var isRead: Bool
    /// What the job did: fail (`report`), go on (`ignore`) or pause (`stop`).
    public var action: BlockErrorAction

    /// Makes a value (for tests and custom event sources).
    public init(isRead: Bool, action: BlockErrorAction) {
        self.isRead = isRead
        self.action = action
    }
}

/// One event of one job as a ``JobManager`` hands it to its subscribers: the typed event,
/// the job it is about, and the job's figures at the moment it happened (QEMU's
/// `BLOCK_JOB_*` events report them as `offset`, `len` and `speed`).
///
/// The jobs layer names no QMP event; the monitor maps these to QMP names and payloads.
public struct JobNotification: Sendable {
    /// The job's ID.
    public let jobID: String
    /// The job's kind.
    public let jobType: JobType
    /// What happened.
    public let event: BlockJobEvent
    /// Bytes done when the event was produced.
    public let completed: UInt64
    /// Bytes to do in all (done included), as far as the job knew when the event was produced.
    public let total: UInt64
    /// The rate limit when the event was produced, in bytes per second (0: none).
    public let speed: UInt64

    /// Makes a notification (for tests and custom event sources); every parameter is the
    /// property of the same name.
    public init(jobID: String, jobType: JobType, event: BlockJobEvent, completed: UInt64 = 0, total: UInt64 = 0,
                speed: UInt64 = 0) {
        self.jobID = jobID
        self.jobType = jobType
        self.event = event
        self.completed = completed
        self.total = total
        self.speed = speed
    }
}
