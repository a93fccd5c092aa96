#if canImport(Glibc)
import Glibc
#endif
import QBlockCore

/// The user verbs and the end of a job's life: completion, finalization, abort, dismissal
/// (QEMU's `job_completed`, `job_do_finalize`, `job_finalize_single`, `job_conclude`).
extension Job {
    /// Starts the driver's body in its own task (`created` → `running`).
    func start() {
        withState {
            busy = true
            transitionLocked(.running)
        }
        Task.detached { [self] in
            await pausePoint()
            var failure: Error?
            if !isCancelled {
                do { try await driver.run(self) } catch { failure = error }
            }
            await completed(failure)
        }
    }

    // MARK: Verbs

    package func refusal(_ verb: JobVerb) -> BlockError? {
        lock.withLock {
            (try? sm.check(verb)) == nil
                ? BlockError(.invalidArgument, "Job '\(id)' in state '\(sm.status.rawValue)' cannot accept command verb '\(verb.rawValue)'",
                             operation: verb.rawValue)
                : nil
        }
    }

    /// Pauses the job at its next pause point (`block-job-pause`, `job-pause`).
    /// - Throws: ``BlockError`` if the state refuses `pause` or the job is already paused.
    public func pause() throws {
        if let e = refusal(.pause) { throw e }
        try lock.withLock {
            if userPaused { throw BlockError(.invalidArgument, "Job is already paused", operation: "pause") }
            userPaused = true
            pauseCount += 1
        }
        kick()
    }

    /// Resumes a job paused by a user or by the `stop` error policy, clearing its I/O
    /// status (`block-job-resume`, `job-resume`).
    /// - Throws: ``BlockError`` if the job was not paused or the state refuses `resume`.
    public func resume() throws {
        try lock.withLock {
            if !userPaused || pauseCount <= 0 {
                throw BlockError(.invalidArgument, "Can't resume a job that was not paused", operation: "resume")
            }
        }
        if let e = refusal(.resume) { throw e }
        let wake: Bool = lock.withLock {
            ioStatus = .ok
            userPaused = false
            pauseCount -= 1
            return pauseCount == 0
        }
        if wake { kick() }
    }

    /// Changes the rate limit (`block-job-set-speed`).
    /// - Throws: ``BlockError`` if the state refuses `set-speed`.
    public func setSpeed(_ bytesPerSecond: UInt64) throws {
        if let e = refusal(.setSpeed) { throw e }
        lock.withLock { bucket.setRate(bytesPerSecond) }
        kick()
    }

    /// Completes a ready job (`block-job-complete`, `job-complete`).
    /// - Throws: ``BlockError`` if the job is not ready, cannot be completed, or a cancel was requested.
    public func complete() throws {
        if let e = refusal(.complete) { throw e }
        guard !isCancelRequested, let d = driver as? any CompletableJobDriver else {
            throw BlockError(.invalidArgument, "The active block job '\(id)' cannot be completed", operation: "complete")
        }
        try d.complete(self)
        kick()
    }

    /// Cancels the job (`block-job-cancel`, `job-cancel`). Without `force`, a ready
    /// mirror completes without switching to its target instead.
    /// - Throws: ``BlockError`` if the state refuses `cancel`.
    public func cancel(force: Bool = false) throws {
        if let e = refusal(.cancel) { throw e }
        let effective = driver.cancel(self, force: force)
        let pendingAbort: Bool = lock.withLock {
            if !cancelRequested {
                cancelRequested = true
                forceCancel = effective
            } else if effective {
                forceCancel = true
            }
            if forceCancel && userPaused {
                userPaused = false
                pauseCount -= 1
            }
            return sm.status == .pending && forceCancel
        }
        if pendingAbort {
            Task.detached { [self] in await abortPath(BlockError(.cancelled, "Operation canceled")) }
        } else {
            kick()
        }
    }

    /// Finalizes a pending job (`job-finalize`).
    /// - Throws: ``BlockError`` if the job is not pending.
    public func finalize() async throws {
        if let e = refusal(.finalize) { throw e }
        await doFinalize()
    }

    /// Removes a concluded job (`job-dismiss`).
    /// - Throws: ``BlockError`` if the job is not concluded.
    public func dismiss() throws {
        if let e = refusal(.dismiss) { throw e }
        doDismiss()
    }

    // MARK: Completion

    func completed(_ bodyError: Error?) async {
        let failure: Error? = lock.withLock {
            busy = false
            if let bodyError { return bodyError }
            return forceCancel ? BlockError(.cancelled, "Operation canceled") : nil
        }
        if let failure {
            await abortPath(failure)
            return
        }
        let finalizeNow: Bool = withState {
            transitionLocked(.waiting)
            transitionLocked(.pending)
            return autoFinalize
        }
        if finalizeNow {
            await doFinalize()
        } else {
            // Only a job waiting for job-finalize announces it (QEMU's job_transition_to_pending).
            send(.pending)
        }
    }

    func doFinalize() async {
        if let f = driver as? any FinalizingJobDriver {
            do { try await f.prepare(self) } catch {
                await abortPath(error)
                return
            }
            await f.commit(self)
            await f.clean(self)
        }
        conclude()
    }

    func abortPath(_ failure: Error) async {
        let first: Bool = withState {
            guard sm.status != .aborting && sm.status != .concluded && sm.status != .null else { return false }
            failureCause = failure
            errorMessage = Self.message(of: failure)
            transitionLocked(.aborting)
            return true
        }
        guard first else { return }
        if let f = driver as? any FinalizingJobDriver {
            await f.abort(self)
            await f.clean(self)
        }
        conclude()
    }

    /// Reports the end (``BlockJobEvent/cancelled`` after a forced cancel, else
    /// ``BlockJobEvent/completed(_:)`` with the failure, if any), then concludes.
    func conclude() {
        send(isCancelled ? .cancelled : .completed(failure))
        let dismissNow: Bool = withState {
            transitionLocked(.concluded)
            return autoDismiss
        }
        if dismissNow { doDismiss() }
    }

    func doDismiss() {
        // Out of the manager first: whoever the transition to `null` wakes (a waiter, a
        // JOB_STATUS_CHANGE subscriber) must not find the job in query-jobs any more.
        onDismiss(self)
        withState {
            busy = false
            paused = false
            transitionLocked(.null)
        }
    }

    /// The text QEMU puts in a job's `error` (`query-jobs`, `BLOCK_JOB_COMPLETED`): the
    /// message, or strerror(ECANCELED) for a cancellation.
    package static func message(of error: Error) -> String {
        let e = error.asBlockError
        if e.code == .cancelled { return String(cString: strerror(ECANCELED)) }
        return e.message
    }
}
