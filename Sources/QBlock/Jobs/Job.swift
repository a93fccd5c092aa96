#if canImport(Glibc)
import Glibc
#endif
import QBlockCore

/// Options every job takes (the common arguments of QEMU's job-starting commands).
public struct JobOptions: Sendable {
    /// The job ID (`job-id`); must be well formed and unused.
    public var id: String
    /// Finalize as soon as the body succeeded (`auto-finalize`); otherwise wait in
    /// `pending` for `job-finalize`.
    public var autoFinalize: Bool
    /// Disappear once concluded (`auto-dismiss`); otherwise wait in `concluded` for `job-dismiss`.
    public var autoDismiss: Bool
    /// Bytes per second (`speed`); 0 is unlimited.
    public var speed: UInt64
    /// The clock for rate limiting.
    public var clock: any JobClock

    /// Creates job options; every parameter is the property of the same name. The defaults
    /// are QEMU's: finalize and dismiss automatically, unlimited speed, the system clock.
    public init(id: String, autoFinalize: Bool = true, autoDismiss: Bool = true, speed: UInt64 = 0,
                clock: any JobClock = SystemJobClock()) {
        self.id = id
        self.autoFinalize = autoFinalize
        self.autoDismiss = autoDismiss
        self.speed = speed
        self.clock = clock
    }
}

/// One job: the generic part QEMU keeps in `job.c` and `blockjob.c` — status, pause
/// counting, cancellation, progress, rate limit, error policy and events — around a
/// `JobDriver` that does the work.
///
/// The lifecycle follows ``JobStateMachine``; every verb is checked against its table
/// first. The driver's body runs in its own task; the verbs only change state under a
/// lock and wake the body, so they never wait for I/O.
// @unchecked: every var (state machine, pause/cancel flags, progress, bucket, error, wakeup, queued
// events and waiters) is only touched with `lock` held; event emission is ordered by `emitLock`; the
// lets are immutable or Sendable.
public final class Job: @unchecked Sendable {
    /// The job ID.
    public let id: String
    /// The driver doing the work.
    package let driver: any JobDriver
    /// The job's type.
    public var type: JobType { driver.jobType }
    let clock: any JobClock
    /// Receives every event with the job's figures (the manager's subscribers).
    let emit: @Sendable (JobNotification) -> Void
    /// Receives every event too, in the same order (the library API's handles).
    let observe: (@Sendable (BlockJobEvent) -> Void)?
    let onDismiss: @Sendable (Job) -> Void

    // MARK: State, guarded by `lock`
    let lock = PosixMutex()
    var sm = JobStateMachine()
    var autoFinalize: Bool
    var autoDismiss: Bool
    var pauseCount = 0
    var userPaused = false
    var paused = false
    var busy = false
    var cancelRequested = false
    var forceCancel = false
    var progressCurrent: UInt64 = 0
    var progressTotal: UInt64 = 0
    var bucket: TokenBucket
    var ioStatus: BlockIOStatus = .ok
    var errorMessage: String?
    var failureCause: Error?
    var wakeup: UnsafeContinuation<Void, Never>?
    var wakeGeneration: UInt64 = 0
    var kickPending = false
    /// Events produced under `lock`, delivered by ``flushEvents()`` once it is released.
    var queuedEvents: [JobNotification] = []
    let emitLock = PosixMutex()
    var statusWaiters: [(when: @Sendable (JobStatus) -> Bool, wake: UnsafeContinuation<JobStatus, Never>)] = []
    /// Waiters whose status came, woken by ``flushEvents()`` after the events.
    var queuedWakes: [(UnsafeContinuation<JobStatus, Never>, JobStatus)] = []

    init(options: JobOptions, driver: any JobDriver, emit: @escaping @Sendable (JobNotification) -> Void,
         observe: (@Sendable (BlockJobEvent) -> Void)? = nil, onDismiss: @escaping @Sendable (Job) -> Void) {
        id = options.id
        self.driver = driver
        clock = options.clock
        autoFinalize = options.autoFinalize
        autoDismiss = options.autoDismiss
        bucket = TokenBucket(rate: options.speed)
        self.emit = emit
        self.observe = observe
        self.onDismiss = onDismiss
        transitionLocked(.created)
        flushEvents()
    }

    // MARK: Observing

    /// The current status.
    public var status: JobStatus { lock.withLock { sm.status } }
    /// Bytes done and bytes to do, as `query-jobs` reports them.
    public var progress: (current: UInt64, total: UInt64) { lock.withLock { (progressCurrent, progressTotal) } }
    /// The rate limit in bytes per second (0: none).
    public var speed: UInt64 { lock.withLock { bucket.rate } }
    /// The block job I/O status (`failed`/`nospace` after an error that stopped the job).
    public var blockIOStatus: BlockIOStatus { lock.withLock { ioStatus } }
    /// The error that failed the job, as QEMU words it.
    public var error: String? { lock.withLock { errorMessage } }
    /// The error that failed the job (a forced cancel fails it with `.cancelled`), nil while
    /// it has not failed.
    public var failure: BlockError? { lock.withLock { failureCause?.asBlockError } }
    /// True if the driver body should stop as soon as possible (forced cancel).
    public var isCancelled: Bool { lock.withLock { forceCancel } }
    /// True if any cancel (forced or not) was requested.
    public var isCancelRequested: Bool { lock.withLock { cancelRequested } }
    /// True in `ready` and `standby`.
    public var isReady: Bool { lock.withLock { sm.isReady } }
    /// True while a pause is requested or in effect.
    public var isPaused: Bool { lock.withLock { pauseCount > 0 } }

    /// Waits until the status satisfies `predicate` and returns that status.
    @discardableResult
    public func wait(until predicate: @escaping @Sendable (JobStatus) -> Bool) async -> JobStatus {
        await withUnsafeContinuation { (c: UnsafeContinuation<JobStatus, Never>) in
            let now: JobStatus? = lock.withLock {
                if predicate(sm.status) { return sm.status }
                statusWaiters.append((predicate, c))
                return nil
            }
            if let now {
                // The transition's events may still be queued: deliver them first.
                flushEvents()
                c.resume(returning: now)
            }
        }
    }

    /// Waits until the status is `status`, or until the job can no longer reach it (a job
    /// that fails before it is ready goes to `aborting`, from which `ready` is unreachable),
    /// and returns the status it stopped at.
    @discardableResult
    public func wait(for status: JobStatus) async -> JobStatus {
        await wait { $0 == status || !JobStateMachine.canReach(status, from: $0) }
    }

    /// Waits until the job has concluded (or was dismissed).
    public func waitConcluded() async {
        await wait { $0 == .concluded || $0 == .null }
    }

    // MARK: For drivers

    /// Sets the total amount of work (bytes).
    package func setProgressTotal(_ total: UInt64) { lock.withLock { progressTotal = total } }
    /// Adds to the total amount of work (a mirror's dirty areas).
    package func increaseProgressTotal(_ delta: UInt64) { lock.withLock { progressTotal += delta } }
    /// Records `bytes` of work done.
    package func progressDone(_ bytes: UInt64) { lock.withLock { progressCurrent += bytes } }

    /// Moves a running job to `ready` and reports ``BlockJobEvent/ready``.
    package func transitionToReady() {
        let done: Bool = withState {
            guard sm.status == .running else { return false }
            transitionLocked(.ready)
            return true
        }
        if done { send(.ready) }
    }

    /// Accounts `bytes` moved and waits as long as the rate limit asks (QEMU's
    /// `block_job_ratelimit_sleep`); also a pause point.
    package func rateLimit(_ bytes: Int64) async {
        var delay = lock.withLock { bucket.account(bytes, now: clock.now()) }
        while delay > 0 && !isCancelled {
            await sleep(nanoseconds: delay)
            delay = lock.withLock { bucket.pendingDelay(now: clock.now()) }
        }
        await pausePoint()
    }

    /// Sleeps for `nanoseconds` unless woken by a cancel, pause or speed change, then
    /// honours a pause request.
    package func sleep(nanoseconds: UInt64) async {
        if isCancelled { return }
        if !lock.withLock({ pauseCount > 0 }) {
            let generation = lock.withLock { wakeGeneration &+ 1 }
            let clock = self.clock
            let timer = Task { [weak self] in
                await clock.sleep(nanoseconds: nanoseconds)
                self?.kick(generation: generation)
            }
            await waitForKick()
            timer.cancel()
        }
        await pausePoint()
    }

    /// Waits until something wakes the job — a complete, cancel, pause or speed change,
    /// or ``wake()`` — then honours a pause request (QEMU's `job_yield`).
    package func yield() async {
        if isCancelled { return }
        if !lock.withLock({ pauseCount > 0 }) { await waitForKick() }
        await pausePoint()
    }

    /// Wakes the body from ``yield()`` or ``sleep(nanoseconds:)`` (new work arrived).
    package func wake() { kick() }

    /// Pauses here while a pause is requested (QEMU's `job_pause_point`): the status
    /// becomes `paused` (or `standby` when ready) until the job is resumed or cancelled.
    package func pausePoint() async {
        while true {
            let previous: JobStatus? = withState {
                guard pauseCount > 0 && !forceCancel else { return nil }
                let s = sm.status
                transitionLocked(s == .ready ? .standby : .paused)
                paused = true
                busy = false
                return s
            }
            guard let previous else { return }
            repeat { await waitForKick() } while lock.withLock({ pauseCount > 0 && !forceCancel })
            withState {
                paused = false
                busy = true
                transitionLocked(previous)
            }
        }
    }

    /// Applies the error policy `policy` to `error` (QEMU's `block_job_error_action`):
    /// reports ``BlockJobEvent/ioError(_:)`` and, for `stop`, pauses the job as if a user had, with
    /// the I/O status set. The caller rethrows on `.report`, goes on on `.ignore`, and on
    /// `.stop` calls ``pausePoint()`` and retries.
    package func errorAction(for error: Error, isRead: Bool, policy: BlockdevOnError) -> BlockErrorAction {
        let errno = error.asBlockError.errno ?? EIO
        let action: BlockErrorAction
        switch policy {
        case .enospc, .auto: action = errno == ENOSPC ? .stop : .report
        case .stop: action = .stop
        case .report: action = .report
        case .ignore: action = .ignore
        }
        if !isCancelled {
            send(.ioError(BlockJobIOError(isRead: isRead, action: action)))
        }
        if action == .stop {
            lock.withLock {
                if !userPaused {
                    pauseCount += 1
                    userPaused = true
                }
                if ioStatus == .ok { ioStatus = errno == ENOSPC ? .nospace : .failed }
            }
        }
        return action
    }

    // MARK: Internals

    /// Moves to `to` (caller holds the lock) and reports ``BlockJobEvent/statusChanged(_:)``.
    func transitionLocked(_ to: JobStatus) {
        let from = sm.status
        do { try sm.transition(to: to) } catch {
            assertionFailure("job \(id): illegal transition \(from) -> \(to)")
            return
        }
        if from != to { queuedEvents.append(notificationLocked(.statusChanged(to))) }
        // Waiters wake after the events are delivered (``flushEvents()``), so that one
        // who saw the status also sees its status change event.
        for w in statusWaiters where w.when(to) { queuedWakes.append((w.wake, to)) }
        statusWaiters.removeAll { $0.when(to) }
    }

    /// Runs `body` under the state lock, then delivers the events it queued (so that an
    /// event subscriber may query the job).
    @discardableResult
    func withState<R>(_ body: () throws -> R) rethrows -> R {
        let r = try lock.withLock(body)
        flushEvents()
        return r
    }

    /// Delivers queued events in order, then wakes the status waiters they concern.
    func flushEvents() {
        emitLock.withLock {
            while true {
                let (batch, wakes) = lock.withLock {
                    let b = (queuedEvents, queuedWakes)
                    queuedEvents = []
                    queuedWakes = []
                    return b
                }
                if batch.isEmpty && wakes.isEmpty { return }
                for n in batch {
                    emit(n)
                    observe?(n.event)
                }
                for (c, status) in wakes { c.resume(returning: status) }
            }
        }
    }

    /// Reports `event`, with the job's figures of this moment, after any queued events.
    func send(_ event: BlockJobEvent) {
        lock.withLock { queuedEvents.append(notificationLocked(event)) }
        flushEvents()
    }

    /// `event` with the job's current figures (caller holds the lock).
    func notificationLocked(_ event: BlockJobEvent) -> JobNotification {
        JobNotification(jobID: id, jobType: type, event: event, completed: progressCurrent, total: progressTotal,
                        speed: bucket.rate)
    }

    /// Wakes the body from a sleep or pause (QEMU's `job_enter`).
    func kick(generation: UInt64? = nil) {
        let c: UnsafeContinuation<Void, Never>? = lock.withLock {
            if let generation, generation != wakeGeneration { return nil }
            if let w = wakeup {
                wakeup = nil
                return w
            }
            if generation == nil { kickPending = true }
            return nil
        }
        c?.resume()
    }

    func waitForKick() async {
        await withUnsafeContinuation { (c: UnsafeContinuation<Void, Never>) in
            let now: Bool = lock.withLock {
                if kickPending { kickPending = false; return true }
                wakeGeneration &+= 1
                wakeup = c
                busy = false
                return false
            }
            if now { c.resume() }
        }
        lock.withLock { busy = true }
    }
}
