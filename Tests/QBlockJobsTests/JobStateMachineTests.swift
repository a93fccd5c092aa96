import Testing
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

/// The job lifecycle tables, checked cell by cell against QEMU 7.2's `JobSTT` and `JobVerbTable`.
@Suite struct JobStateMachineTests {
    /// Every allowed transition, written independently of the table in the source.
    static let allowed: Set<String> = [
        "undefined>created",
        "created>running", "created>aborting", "created>null",
        "running>paused", "running>ready", "running>waiting", "running>aborting",
        "paused>running",
        "ready>standby", "ready>waiting", "ready>aborting",
        "standby>ready",
        "waiting>pending", "waiting>aborting",
        "pending>aborting", "pending>concluded",
        "aborting>aborting", "aborting>concluded",
        "concluded>null",
    ]

    /// Every verb each status accepts.
    static let accepted: [JobVerb: Set<JobStatus>] = [
        .cancel: [.created, .running, .paused, .ready, .standby, .waiting, .pending],
        .pause: [.created, .running, .paused, .ready, .standby],
        .resume: [.created, .running, .paused, .ready, .standby],
        .setSpeed: [.created, .running, .paused, .ready, .standby],
        .complete: [.ready, .standby],
        .finalize: [.pending],
        .dismiss: [.concluded],
    ]

    @Test(arguments: JobStatus.allCases)
    func transitionsFrom(_ from: JobStatus) throws {
        for to in JobStatus.allCases {
            let expected = Self.allowed.contains("\(from.rawValue)>\(to.rawValue)")
            #expect(JobStateMachine.allows(from: from, to: to) == expected, "\(from) -> \(to)")
            var sm = JobStateMachine(status: from)
            if expected || from == to {
                try sm.transition(to: to)
                #expect(sm.status == to)
            } else {
                #expect(throws: JobStateMachine.Refusal.transition(from: from, to: to)) { try sm.transition(to: to) }
                #expect(sm.status == from)
            }
        }
    }

    @Test(arguments: JobVerb.allCases)
    func verbInEveryStatus(_ verb: JobVerb) {
        for status in JobStatus.allCases {
            let expected = Self.accepted[verb]?.contains(status) ?? false
            #expect(JobStateMachine.accepts(verb, in: status) == expected, "\(verb) in \(status)")
            let sm = JobStateMachine(status: status)
            if expected {
                #expect(throws: Never.self) { try sm.check(verb) }
            } else {
                #expect(throws: JobStateMachine.Refusal.verb(verb, in: status)) { try sm.check(verb) }
            }
        }
    }

    @Test func readyAndCompleted() {
        #expect(JobStatus.allCases.filter { JobStateMachine(status: $0).isReady } == [.ready, .standby])
        #expect(JobStatus.allCases.filter { JobStateMachine(status: $0).isCompleted }
                == [.waiting, .pending, .aborting, .concluded, .null])
    }

    @Test func idsAreCheckedLikeQEMU() {
        #expect(JobManager.isWellFormed("job0"))
        #expect(JobManager.isWellFormed("a-b.c_d"))
        #expect(!JobManager.isWellFormed("0job"))
        #expect(!JobManager.isWellFormed(""))
        #expect(!JobManager.isWellFormed("a b"))
    }

    @Test func tokenBucket() {
        var b = TokenBucket(rate: 1_000_000)          // 1 MB/s, burst 100 kB
        #expect(b.account(100_000, now: 0) == 0)      // the burst
        #expect(b.account(100_000, now: 0) == 100_000_000)  // 100 kB of debt: 100 ms
        #expect(b.pendingDelay(now: 50_000_000) == 50_000_000)
        #expect(b.pendingDelay(now: 100_000_000) == 0)
        b.setRate(0)
        #expect(b.account(1 << 30, now: 100_000_000) == 0)
    }
}

extension JobStateMachineTests {
    @Test func readyIsUnreachableOnceAJobFails() {
        #expect(JobStateMachine.canReach(.ready, from: .created))
        #expect(JobStateMachine.canReach(.ready, from: .paused))
        #expect(JobStateMachine.canReach(.ready, from: .standby))
        #expect(!JobStateMachine.canReach(.ready, from: .aborting))
        #expect(!JobStateMachine.canReach(.ready, from: .waiting))
        #expect(!JobStateMachine.canReach(.ready, from: .concluded))
        #expect(JobStateMachine.canReach(.null, from: .aborting))
        #expect(JobStateMachine.canReach(.concluded, from: .concluded))
        #expect(!JobStateMachine.canReach(.created, from: .running))
    }
}
