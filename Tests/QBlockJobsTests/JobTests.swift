import Testing
import Glibc
import QBlock
import TestSupport
@testable import QBlockCore
@testable import QBlockNBDWire
@testable import QBlockBitmaps
@testable import QBlockGraph
@testable import QBlockDrivers
@testable import QBlockOpen
@testable import QBlockOperations
@testable import QBlockJobs
@testable import QBlockNBDServer
@testable import QBlockMonitor

/// Collects the events a ``JobManager`` reports: the typed notifications, and the QMP
/// events the monitor makes of them (names and `data`, as clients see them).
final class EventLog: @unchecked Sendable {
    private let lock = PosixMutex()
    private var list: [JobNotification] = []
    init(_ manager: JobManager) { manager.subscribe { [weak self] n in self?.lock.withLock { self?.list.append(n) } } }
    /// The typed notifications, in order.
    var notifications: [JobNotification] { lock.withLock { list } }
    /// The QMP events, in order.
    var events: [(name: String, data: QObject.Dict)] { notifications.compactMap { QMPJobEvents.event(for: $0) } }
    var names: [String] { events.map(\.name) }
    /// The statuses of the JOB_STATUS_CHANGE events, in order.
    var statuses: [String] {
        events.compactMap { e -> String? in
            guard e.name == "JOB_STATUS_CHANGE", case .string(let s)? = e.data["status"] else { return nil }
            return s
        }
    }
    func first(_ name: String) -> (name: String, data: QObject.Dict)? { events.first { $0.name == name } }
}

/// A job body that does `chunks` steps of `chunkSize` bytes with pause points and the
/// rate limit, optionally failing some steps, optionally waiting in `ready` for completion.
final class StepDriver: CompletableJobDriver, FinalizingJobDriver, @unchecked Sendable {
    let jobType: JobType
    let chunks: Int
    let chunkSize: Int64
    let policy: BlockdevOnError
    let failures: PosixMutex = PosixMutex()
    var failuresLeft: Int
    var failErrno: Int32
    var shouldComplete = false
    var log: [String] = []
    let stepDelay: UInt64

    init(type: JobType = .stream, chunks: Int = 10, chunkSize: Int64 = 65536, policy: BlockdevOnError = .report,
         failures: Int = 0, errno: Int32 = ENOSPC, stepDelay: UInt64 = 0) {
        jobType = type
        self.chunks = chunks
        self.chunkSize = chunkSize
        self.policy = policy
        failuresLeft = failures
        failErrno = errno
        self.stepDelay = stepDelay
    }

    func run(_ job: Job) async throws {
        job.setProgressTotal(UInt64(chunks) * UInt64(chunkSize))
        var i = 0
        while i < chunks {
            if job.isCancelled { return }
            if stepDelay > 0 { try? await Task.sleep(nanoseconds: stepDelay) }
            let fail = failures.withLock { () -> Bool in
                if failuresLeft > 0 { failuresLeft -= 1; return true }
                return false
            }
            if fail {
                let e = BlockError(.noSpace, "No space left on device", errno: failErrno)
                switch job.errorAction(for: e, isRead: false, policy: policy) {
                case .report: throw e
                case .ignore: break
                case .stop: await job.pausePoint(); continue
                }
            }
            job.progressDone(UInt64(chunkSize))
            await job.rateLimit(chunkSize)
            i += 1
        }
        guard jobType == .mirror else { return }
        job.transitionToReady()
        while !failures.withLock({ shouldComplete }) && !job.isCancelRequested {
            await job.yield()
        }
    }

    func complete(_ job: Job) throws { failures.withLock { shouldComplete = true } }
    func cancel(_ job: Job, force: Bool) -> Bool { jobType == .mirror ? force || !job.isReady : true }
    func prepare(_ job: Job) async throws { failures.withLock { log.append("prepare") } }
    func commit(_ job: Job) async { failures.withLock { log.append("commit") } }
    func abort(_ job: Job) async { failures.withLock { log.append("abort") } }
    func clean(_ job: Job) async { failures.withLock { log.append("clean") } }
    var calls: [String] { failures.withLock { log } }
}

@Suite struct JobTests {
    /// A mirror-like job that fails before it is ready: waiting for `ready` returns (it
    /// used to wait forever) with the status the job stopped at.
    @Test func waitForReadyReturnsWhenTheJobFailsFirst() async throws {
        let m = JobManager()
        let job = try m.start(StepDriver(type: .mirror, failures: 1), options: JobOptions(id: "m", autoDismiss: false))
        let reached = await job.wait(for: .ready)
        #expect(reached == .aborting || reached == .concluded)
        await job.waitConcluded()
        #expect(job.failure?.code == .noSpace)
        #expect(job.error == "No space left on device")
    }

    @Test func runsToCompletionWithQEMUsEvents() async throws {
        let m = JobManager()
        let events = EventLog(m)
        let d = StepDriver()
        let job = try m.start(d, options: JobOptions(id: "job0"))
        await job.wait(for: .null)
        #expect(events.statuses == ["created", "running", "waiting", "pending", "concluded", "null"])
        #expect(events.names.filter { $0 != "JOB_STATUS_CHANGE" } == ["BLOCK_JOB_COMPLETED"])
        let c = try #require(events.first("BLOCK_JOB_COMPLETED"))
        #expect(c.data["device"] == .string("job0"))
        #expect(c.data["type"] == .string("stream"))
        #expect(c.data["len"] == .int(655360))
        #expect(c.data["offset"] == .int(655360))
        #expect(c.data["error"] == nil)
        #expect(d.calls == ["prepare", "commit", "clean"])
        #expect(m.job("job0") == nil)
    }

    /// The jobs layer reports typed events only, with the figures of their moment; the
    /// monitor's mapping decides the QMP events (none for the end of a job that is not a
    /// block job, as QEMU).
    @Test func reportsTypedEventsAndTheMonitorNamesThem() async throws {
        let m = JobManager()
        let events = EventLog(m)
        let job = try m.start(StepDriver(type: .create, chunks: 2, chunkSize: 512), options: JobOptions(id: "c"))
        await job.wait(for: .null)
        let typed = events.notifications.map(\.event.description)
        #expect(typed == ["status(created)", "status(running)", "status(waiting)", "status(pending)", "completed",
                          "status(concluded)", "status(null)"])
        let end = try #require(events.notifications.first { if case .completed = $0.event { true } else { false } })
        #expect(end.jobID == "c" && end.jobType == .create && end.completed == 1024 && end.total == 1024)
        #expect(Set(events.names) == ["JOB_STATUS_CHANGE"])
    }

    @Test func manualFinalizeAndDismiss() async throws {
        let m = JobManager()
        let events = EventLog(m)
        let job = try m.start(StepDriver(), options: JobOptions(id: "j", autoFinalize: false, autoDismiss: false))
        await job.wait(for: .pending)
        #expect(throws: BlockError.self) { try job.dismiss() }
        try await job.finalize()
        #expect(job.status == .concluded)
        #expect(m.job("j") != nil)
        try job.dismiss()
        #expect(job.status == .null)
        #expect(m.job("j") == nil)
        #expect(events.statuses == ["created", "running", "waiting", "pending", "concluded", "null"])
        #expect(events.names.contains("BLOCK_JOB_PENDING"))
    }

    @Test func duplicateAndInvalidIDs() throws {
        let m = JobManager()
        _ = try m.start(StepDriver(type: .mirror), options: JobOptions(id: "a"))
        #expect(throws: BlockError.self) { try m.start(StepDriver(), options: JobOptions(id: "a")) }
        #expect(throws: BlockError.self) { try m.start(StepDriver(), options: JobOptions(id: "1a")) }
        try m.find("a").cancel(force: true)
    }

    @Test func verbsRefusedWithQEMUsMessage() async throws {
        let m = JobManager()
        let job = try m.start(StepDriver(), options: JobOptions(id: "j", autoDismiss: false))
        await job.wait(for: .concluded)
        do { try job.pause(); Issue.record("pause accepted") } catch let e as BlockError {
            #expect(e.message == "Job 'j' in state 'concluded' cannot accept command verb 'pause'")
        }
        #expect(throws: BlockError.self) { try job.complete() }
        try job.dismiss()
    }

    @Test func pauseResumeAndForceCancel() async throws {
        let m = JobManager()
        let events = EventLog(m)
        let clock = ManualJobClock()
        // 1 MB/s with 64 KiB steps: the job sleeps on the virtual clock after the burst.
        let job = try m.start(StepDriver(chunks: 1000), options: JobOptions(id: "p", speed: 1_000_000, clock: clock))
        try job.pause()
        #expect(throws: BlockError.self) { try job.pause() }   // "Job is already paused"
        await job.wait(for: .paused)
        #expect(job.blockInfo.paused)
        try job.resume()
        await job.wait(for: .running)
        #expect(throws: BlockError.self) { try job.resume() }  // not paused
        try job.cancel(force: true)
        await job.wait(for: .null)
        #expect(events.statuses == ["created", "running", "paused", "running", "aborting", "concluded", "null"])
        #expect(events.names.contains("BLOCK_JOB_CANCELLED"))
        #expect(!events.names.contains("BLOCK_JOB_COMPLETED"))
    }

    @Test func readyCompleteAndStandby() async throws {
        let m = JobManager()
        let events = EventLog(m)
        let job = try m.start(StepDriver(type: .mirror), options: JobOptions(id: "m"))
        await job.wait(for: .ready)
        #expect(job.blockInfo.ready)
        try job.pause()
        await job.wait(for: .standby)
        try job.resume()
        await job.wait(for: .ready)
        try job.complete()
        await job.wait(for: .null)
        #expect(events.statuses == ["created", "running", "ready", "standby", "ready", "waiting", "pending", "concluded", "null"])
        #expect(events.names.filter { $0.hasPrefix("BLOCK_JOB") } == ["BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED"])
    }

    @Test func softCancelOfReadyMirrorCompletes() async throws {
        let m = JobManager()
        let events = EventLog(m)
        let d = StepDriver(type: .mirror)
        let job = try m.start(d, options: JobOptions(id: "m"))
        await job.wait(for: .ready)
        try job.cancel()
        #expect(throws: BlockError.self) { try job.complete() }  // a cancel was requested
        await job.wait(for: .null)
        #expect(events.names.contains("BLOCK_JOB_COMPLETED"))
        #expect(!events.names.contains("BLOCK_JOB_CANCELLED"))
        #expect(d.calls == ["prepare", "commit", "clean"])
    }

    @Test func cancelWhilePendingAborts() async throws {
        let m = JobManager()
        let events = EventLog(m)
        let d = StepDriver()
        let job = try m.start(d, options: JobOptions(id: "j", autoFinalize: false))
        await job.wait(for: .pending)
        try job.cancel(force: true)
        await job.wait(for: .null)
        #expect(d.calls == ["abort", "clean"])
        #expect(events.statuses.suffix(3) == ["aborting", "concluded", "null"])
        #expect(events.names.contains("BLOCK_JOB_CANCELLED"))
    }

    @Test func rateLimitOnVirtualClock() async throws {
        let m = JobManager()
        let clock = ManualJobClock()
        // 10 steps of 100 kB at 200 kB/s: 1 MB takes 5 s minus the 20 kB burst.
        let job = try m.start(StepDriver(chunks: 10, chunkSize: 100_000),
                              options: JobOptions(id: "r", speed: 200_000, clock: clock))
        while job.status != .null {
            if clock.sleeperCount > 0 { clock.advance(by: 10_000_000) } else { await Task.yield() }
        }
        // The last step's debt is paid too: 1 MB - burst, at 200 kB/s.
        let elapsed = clock.now()
        #expect(elapsed >= 4_900_000_000 && elapsed <= 4_910_000_000, "elapsed \(elapsed)")
    }

    @Test func setSpeedWakesASleepingJob() async throws {
        let m = JobManager()
        let clock = ManualJobClock()
        let job = try m.start(StepDriver(chunks: 4, chunkSize: 1_000_000), options: JobOptions(id: "s", speed: 1, clock: clock))
        while clock.sleeperCount == 0 { await Task.yield() }
        #expect(job.speed == 1)
        try job.setSpeed(0)
        await job.wait(for: .null)   // would take 46 days at 1 B/s
    }

    @Test(arguments: [BlockdevOnError.stop, .enospc])
    func stopPolicyPausesUntilResumed(_ policy: BlockdevOnError) async throws {
        let m = JobManager()
        let events = EventLog(m)
        let job = try m.start(StepDriver(policy: policy, failures: 1), options: JobOptions(id: "e"))
        await job.wait(for: .paused)
        #expect(job.blockInfo.ioStatus == .nospace)
        #expect(job.blockInfo.paused)
        let e = try #require(events.first("BLOCK_JOB_ERROR"))
        #expect(e.data["action"] == .string("stop"))
        #expect(e.data["operation"] == .string("write"))
        try job.resume()
        await job.wait(for: .null)
        #expect(events.first("BLOCK_JOB_COMPLETED")?.data["error"] == nil)
        #expect(events.first("BLOCK_JOB_COMPLETED")?.data["offset"] == .int(655360))
    }

    @Test func reportPolicyFailsTheJob() async throws {
        let m = JobManager()
        let events = EventLog(m)
        let job = try m.start(StepDriver(policy: .enospc, failures: 1, errno: EIO), options: JobOptions(id: "e", autoDismiss: false))
        await job.wait(for: .concluded)
        #expect(events.first("BLOCK_JOB_ERROR")?.data["action"] == .string("report"))
        #expect(events.first("BLOCK_JOB_COMPLETED")?.data["error"] == .string("No space left on device"))
        #expect(job.info.error == "No space left on device")
        #expect(events.statuses == ["created", "running", "aborting", "concluded"])
        try job.dismiss()
    }

    @Test func ignorePolicyGoesOn() async throws {
        let m = JobManager()
        let events = EventLog(m)
        let job = try m.start(StepDriver(policy: .ignore, failures: 2), options: JobOptions(id: "e"))
        await job.wait(for: .null)
        #expect(events.names.filter { $0 == "BLOCK_JOB_ERROR" }.count == 2)
        #expect(events.first("BLOCK_JOB_COMPLETED")?.data["error"] == nil)
    }
}
