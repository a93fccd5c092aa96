/// A job's status, as QAPI's `JobStatus` spells it (`qapi/job.json`).
public enum JobStatus: String, CaseIterable, Sendable, Hashable {
    case undefined, created, running, paused, ready, standby, waiting, pending, aborting, concluded, null
}

/// A command a user can send to a job, as QAPI's `JobVerb` spells it.
public enum JobVerb: String, CaseIterable, Sendable, Hashable {
    case cancel, pause, resume
    case setSpeed = "set-speed"
    case complete, dismiss, finalize
}

/// The job lifecycle as a pure value: which status may follow which, and which verbs each
/// status accepts. The two tables are QEMU 7.2's `JobSTT` and `JobVerbTable` (`job.c`),
/// written out literally so that a reader can compare them row by row.
///
/// ```
/// created ─► running ─► waiting ─► pending ─► concluded ─► null
///              │ ▲  │                  │          ▲
///     paused ◄─┘ │  └► ready ⇄ standby  └► aborting ┘
///        └───────┘       └► waiting / aborting
/// ```
public struct JobStateMachine: Sendable, Equatable {
    /// The current status.
    public private(set) var status: JobStatus

    /// A refused transition or verb.
    public enum Refusal: Error, Equatable, Sendable {
        case transition(from: JobStatus, to: JobStatus)
        case verb(JobVerb, in: JobStatus)
    }

    /// Starts in `undefined`, the status before `created`.
    public init(status: JobStatus = .undefined) { self.status = status }

    // Column order of both tables: U C R P Y S W D X E N.
    static let order: [JobStatus] = [.undefined, .created, .running, .paused, .ready, .standby,
                                     .waiting, .pending, .aborting, .concluded, .null]

    /// `transitions[from][to]`.
    static let transitions: [JobStatus: [Int]] = [
        //                 U  C  R  P  Y  S  W  D  X  E  N
        .undefined:     [0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        .created:       [0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 1],
        .running:       [0, 0, 0, 1, 1, 0, 1, 0, 1, 0, 0],
        .paused:        [0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0],
        .ready:         [0, 0, 0, 0, 0, 1, 1, 0, 1, 0, 0],
        .standby:       [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0],
        .waiting:       [0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0],
        .pending:       [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0],
        .aborting:      [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0],
        .concluded:     [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
        .null:          [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    ]

    /// `verbs[verb][status]`.
    static let verbs: [JobVerb: [Int]] = [
        //                 U  C  R  P  Y  S  W  D  X  E  N
        .cancel:        [0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        .pause:         [0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
        .resume:        [0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
        .setSpeed:      [0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
        .complete:      [0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0],
        .finalize:      [0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0],
        .dismiss:       [0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0],
    ]

    static func column(_ s: JobStatus) -> Int { order.firstIndex(of: s) ?? 0 }

    /// Whether `to` may follow `from`.
    public static func allows(from: JobStatus, to: JobStatus) -> Bool {
        transitions[from]?[column(to)] == 1
    }

    /// Whether a job in `from` can still reach `target` through zero or more transitions
    /// of the table (a failed job never becomes `ready`; a `concluded` one only `null`).
    public static func canReach(_ target: JobStatus, from: JobStatus) -> Bool {
        reachable[from]?.contains(target) ?? false
    }

    /// For each status, the statuses reachable from it (itself included): the transitive
    /// closure of ``transitions``.
    static let reachable: [JobStatus: Set<JobStatus>] = {
        var result: [JobStatus: Set<JobStatus>] = [:]
        for start in order {
            var seen: Set<JobStatus> = [start]
            var todo = [start]
            while let s = todo.popLast() {
                for next in order where allows(from: s, to: next) && seen.insert(next).inserted { todo.append(next) }
            }
            result[start] = seen
        }
        return result
    }()

    /// Whether a job in `status` accepts `verb`.
    public static func accepts(_ verb: JobVerb, in status: JobStatus) -> Bool {
        verbs[verb]?[column(status)] == 1
    }

    /// Moves to `to`. A transition to the current status is a no-op (QEMU allows
    /// `aborting` → `aborting`; for the others it never happens).
    /// - Throws: ``Refusal/transition(from:to:)`` when the table forbids it.
    public mutating func transition(to: JobStatus) throws {
        guard Self.allows(from: status, to: to) || to == status else {
            throw Refusal.transition(from: status, to: to)
        }
        status = to
    }

    /// Checks that the current status accepts `verb`.
    /// - Throws: ``Refusal/verb(_:in:)``.
    public func check(_ verb: JobVerb) throws {
        guard Self.accepts(verb, in: status) else { throw Refusal.verb(verb, in: status) }
    }

    /// True in `ready` and `standby` (QEMU's `job_is_ready`).
    public var isReady: Bool { status == .ready || status == .standby }

    /// True once the job's body has finished (`waiting` and after; QEMU's `job_is_completed`).
    public var isCompleted: Bool {
        switch status {
        case .waiting, .pending, .aborting, .concluded, .null: return true
        default: return false
        }
    }
}
