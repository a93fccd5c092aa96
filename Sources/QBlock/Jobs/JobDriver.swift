/// The kind of a job, as QAPI's `JobType` spells it.
public enum JobType: String, Sendable, CaseIterable {
    case commit, stream, mirror, backup, create, amend
    case snapshotLoad = "snapshot-load", snapshotSave = "snapshot-save", snapshotDelete = "snapshot-delete"

    /// Whether jobs of this type are block jobs (QEMU's `BlockJob`): they appear in
    /// `query-block-jobs` and send the `BLOCK_JOB_*` events. `create`, `amend` and the
    /// snapshot jobs are plain jobs with `JOB_STATUS_CHANGE` only.
    public var isBlockJob: Bool {
        switch self {
        case .commit, .stream, .mirror, .backup: return true
        case .create, .amend, .snapshotLoad, .snapshotSave, .snapshotDelete: return false
        }
    }
}

/// What a job does about an I/O error (QAPI's `BlockdevOnError`).
public enum BlockdevOnError: String, Sendable, CaseIterable {
    /// Fail the job.
    case report
    /// Go on as if the request had succeeded (the job may retry the area later).
    case ignore
    /// Stop on ENOSPC, report anything else.
    case enospc
    /// Stop: the job pauses with its I/O status set until a user resumes it; then the
    /// failed request is retried.
    case stop
    /// Same as `enospc` for jobs.
    case auto
}

/// What was done about one error (QAPI's `BlockErrorAction`), as in `BLOCK_JOB_ERROR`.
public enum BlockErrorAction: String, Sendable {
    case ignore, report, stop
}

/// A block job's I/O status (QAPI's `BlockDeviceIoStatus`).
public enum BlockIOStatus: String, Sendable {
    case ok, failed, nospace
}

/// The work of one kind of job: the generic ``Job`` runs the lifecycle (states, pause,
/// cancel, rate limit, events) and calls these.
///
/// Optional steps are separate protocols: ``CompletableJobDriver`` (jobs with a ready
/// phase), ``FinalizingJobDriver`` (graph changes made at finalization).
///
/// The hooks are the job's internals, not API: users drive a job through ``Job``'s verbs
/// (or a ``BlockJobHandle``), never by calling ``run(_:)`` or ``CompletableJobDriver/complete(_:)``.
package protocol JobDriver: AnyObject, Sendable {
    /// The job's type.
    var jobType: JobType { get }
    /// The job's body. It calls ``Job/pausePoint()`` between requests, ``Job/rateLimit(_:)``
    /// after each, reports progress, and returns when done or when ``Job/isCancelled``.
    /// - Throws: the error that fails the job.
    func run(_ job: Job) async throws
    /// A cancel request arrived. Returns whether it is a forced cancel; a mirror that is
    /// ready treats a soft cancel as "complete without switching to the target".
    func cancel(_ job: Job, force: Bool) -> Bool
}

extension JobDriver {
    package func cancel(_ job: Job, force: Bool) -> Bool { true }
}

/// A job that reaches a ready state and is then completed by the user (`block-job-complete`).
package protocol CompletableJobDriver: JobDriver {
    /// The user asked to complete a ready job; ``JobDriver/run(_:)`` should finish soon.
    /// - Throws: ``BlockError`` when completion is not possible now.
    func complete(_ job: Job) throws
}

/// A job whose effects are applied (or undone) when it is finalized, as QEMU's
/// `.prepare`, `.commit`, `.abort` and `.clean` callbacks.
package protocol FinalizingJobDriver: JobDriver {
    /// The body succeeded: make the graph change that may still fail (drop a backing
    /// link, pivot). A throw turns the job into a failed one (then ``abort(_:)`` runs).
    func prepare(_ job: Job) async throws
    /// The job succeeded and is being finalized.
    func commit(_ job: Job) async
    /// The job failed or was cancelled: undo what ``JobDriver/run(_:)`` set up.
    func abort(_ job: Job) async
    /// Runs after ``commit(_:)`` or ``abort(_:)``: release what the job held.
    func clean(_ job: Job) async
}
