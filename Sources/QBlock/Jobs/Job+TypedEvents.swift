import QBlockCore
/// What a job reports as it runs, as a typed value (the library's view of QEMU's
/// `JOB_STATUS_CHANGE`, `BLOCK_JOB_READY`, `BLOCK_JOB_ERROR`, `BLOCK_JOB_PENDING`,
/// `BLOCK_JOB_COMPLETED` and `BLOCK_JOB_CANCELLED`).
///
/// A job produces these in the order QMP clients see its events; ``BlockJobHandle/events``
/// delivers them as an `AsyncSequence`.
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
    /// The job ended: `nil` when it succeeded, else why it failed (`BLOCK_JOB_COMPLETED`).
    case completed(BlockError?)
    /// The job was cancelled before it finished (`BLOCK_JOB_CANCELLED`).
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
