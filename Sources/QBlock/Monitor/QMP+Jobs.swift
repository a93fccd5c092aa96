#if canImport(Glibc)
import Glibc
#endif
import QBlockCore
import QBlockGraph
import QBlockJobs
import QBlockOperations

/// The job commands (QEMU 7.2's `qapi/job.json` and the block-job part of
/// `qapi/block-core.json`): control verbs, queries, and `block-stream` / `block-commit`.
/// The jobs run in their own tasks; every command here only starts, changes or reads a
/// job and returns at once. Job events reach every client through the monitor, which
/// names them (``QMPJobEvents``: the jobs layer reports typed events only).
extension QMPMonitor {
    /// The monitor's job registry; its events go out as QMP events.
    public var jobs: JobManager {
        state(QMPJobState.self) { QMPJobState(monitor: self) }.manager
    }

    func registerJobCommands() {
        // Verbs by block-job name (`device`) and by job ID (`id`).
        for (name, key) in [("block-job-pause", "device"), ("job-pause", "id")] {
            register(name) { args, ctx in
                let job = try ctx.monitor.findJob(args, key)
                try QMPJobs.apply { try job.pause() }
                return .dict(QObject.Dict())
            }
        }
        for (name, key) in [("block-job-resume", "device"), ("job-resume", "id")] {
            register(name) { args, ctx in
                let job = try ctx.monitor.findJob(args, key)
                try QMPJobs.apply { try job.resume() }
                return .dict(QObject.Dict())
            }
        }
        for (name, key) in [("block-job-complete", "device"), ("job-complete", "id")] {
            register(name) { args, ctx in
                let job = try ctx.monitor.findJob(args, key)
                try QMPJobs.apply { try job.complete() }
                return .dict(QObject.Dict())
            }
        }
        register("block-job-cancel") { args, ctx in
            let device = try args.string("device")
            let force = try args.bool("force", default: false)
            try args.done()
            let job = try ctx.monitor.blockJob(device)
            try QMPJobs.apply { try job.cancel(force: force) }
            return .dict(QObject.Dict())
        }
        register("job-cancel") { args, ctx in
            let job = try ctx.monitor.findJob(args, "id")
            try QMPJobs.apply { try job.cancel(force: true) }
            return .dict(QObject.Dict())
        }
        for name in ["job-finalize", "block-job-finalize"] {
            register(name) { args, ctx in
                let job = try ctx.monitor.findJob(args, "id", block: name.hasPrefix("block"))
                if let e = job.refusal(.finalize) { throw QMPError.generic(e.message) }
                Task.detached { try? await job.finalize() }
                return .dict(QObject.Dict())
            }
        }
        for name in ["job-dismiss", "block-job-dismiss"] {
            register(name) { args, ctx in
                let job = try ctx.monitor.findJob(args, "id", block: name.hasPrefix("block"))
                try QMPJobs.apply { try job.dismiss() }
                return .dict(QObject.Dict())
            }
        }
        register("block-job-set-speed") { args, ctx in
            let device = try args.string("device")
            let speed = try args.int("speed")
            try args.done()
            let job = try ctx.monitor.blockJob(device)
            if speed < 0 { throw QMPError.generic("Parameter 'speed' expects a non-negative value") }
            try QMPJobs.apply { try job.setSpeed(UInt64(speed)) }
            return .dict(QObject.Dict())
        }
        register("query-block-jobs", exclusive: false) { args, ctx in
            try args.done()
            return .list(ctx.monitor.jobs.all.reversed().filter { $0.status != .null && $0.type.isBlockJob }.map { $0.blockInfo.qobject })
        }
        register("query-jobs", exclusive: false) { args, ctx in
            try args.done()
            // Newest first, as QEMU's job list (new jobs go to its head).
            return .list(ctx.monitor.jobs.all.reversed().filter { $0.status != .null }.map { $0.info.qobject })
        }
        registerStreamCommand()
        registerCommitCommand()
    }

    /// The job named by member `key`, with QEMU's errors for a missing one.
    func findJob(_ args: QMPArguments, _ key: String, block: Bool? = nil) throws -> Job {
        let id = try args.string(key)
        try args.done()
        if block ?? (key == "device") { return try blockJob(id) }
        guard let j = jobs.job(id), j.status != .null else { throw QMPError.generic("Job not found") }
        return j
    }

    /// A block job by ID: QEMU's `find_block_job` error.
    func blockJob(_ id: String) throws -> Job {
        guard let j = jobs.job(id), j.status != .null, j.type.isBlockJob else { throw QMPError(.deviceNotActive, "Block job '\(id)' not found") }
        return j
    }
}

/// Per-monitor job state.
// @unchecked: no mutable state: `manager` is an immutable reference to a thread-safe JobManager.
final class QMPJobState: @unchecked Sendable {
    let manager = JobManager()
    init(monitor: QMPMonitor) {
        manager.subscribe { [weak monitor] n in
            guard let monitor, let e = QMPJobEvents.event(for: n) else { return }
            monitor.emit(event: e.name, data: e.data)
        }
    }
}

/// Shared argument handling of the job-starting commands.
enum QMPJobs {
    /// Runs a verb, turning its ``BlockError`` into a GenericError with the same text.
    static func apply(_ body: () throws -> Void) throws {
        do { try body() } catch let e as BlockError { throw QMPError.generic(e.message) }
    }

    static let onErrorValues = BlockdevOnError.allCases.map(\.rawValue)

    /// `job-id`, `speed`, `auto-finalize`, `auto-dismiss` (the job ID defaults to `device`).
    static func options(_ args: QMPArguments, device: String) throws -> JobOptions {
        let id = try args.optionalString("job-id") ?? device
        let speed = try args.optionalInt("speed") ?? 0
        if speed < 0 { throw QMPError.generic("Invalid parameter 'speed'") }
        return JobOptions(id: id, autoFinalize: try args.bool("auto-finalize", default: true),
                          autoDismiss: try args.bool("auto-dismiss", default: true), speed: UInt64(speed))
    }

    static func onError(_ args: QMPArguments, _ key: String) throws -> BlockdevOnError {
        BlockdevOnError(rawValue: try args.optionalEnum(key, onErrorValues) ?? "report") ?? .report
    }

    /// The node `device` names (a node name; the daemon has no devices).
    static func node(_ graph: BlockGraph, _ device: String) throws -> BlockNode {
        // A device name (a `vm` drive id) names its backend's current node first.
        if let b = graph.backends.first(where: { !$0.name.isEmpty && $0.name == device }) { return b.node }
        guard let n = graph.node(named: device) else { throw QMPError.noDevice(device: device, node: device) }
        return n
    }

    /// The node of `top`'s backing chain named by node name or by file name.
    static func chainNode(_ top: any BlockDriver, node: String?, file: String?, graph: BlockGraph) throws -> (any BlockDriver)? {
        let chain = Array(top.backingChain.dropFirst())
        if let node {
            guard let n = graph.node(named: node) else { throw QMPError.noDevice(device: node, node: node) }
            guard chain.contains(where: { $0 === n }) else {
                throw QMPError.generic("Node '\(node)' is not a backing image of '\(top.innermostDriver.filename)'")
            }
            return n
        }
        if let file {
            guard let n = chain.first(where: { $0.innermostDriver.filename == file || ImageCommit.matches(file, name: $0.filename, full: $0.innermostDriver.filename) }) else {
                throw QMPError.generic("Can't find '\(file)' in the backing chain")
            }
            return n
        }
        return nil
    }
}

extension JobManager {
    /// Registers a job for a QMP command (errors in QMP's words), not started yet.
    func createForQMP(_ driver: any JobDriver, options: JobOptions) throws -> Job {
        do { return try create(driver, options: options) } catch let e as BlockError { throw QMPError.generic(e.message) }
    }
}

extension JobInfo {
    /// The `query-jobs` entry, members in QEMU's order.
    var qobject: QObject {
        var d = QObject.Dict()
        d["id"] = .string(id)
        d["type"] = .string(type.rawValue)
        d["status"] = .string(status.rawValue)
        d["current-progress"] = .int(Int64(currentProgress))
        d["total-progress"] = .int(Int64(totalProgress))
        if let error { d["error"] = .string(error) }
        return .dict(d)
    }
}

extension BlockJobInfo {
    /// The `query-block-jobs` entry, members in QEMU's order.
    var qobject: QObject {
        var d = QObject.Dict()
        d["type"] = .string(type.rawValue)
        d["device"] = .string(device)
        d["len"] = .int(Int64(len))
        d["offset"] = .int(Int64(offset))
        d["busy"] = .bool(busy)
        d["paused"] = .bool(paused)
        d["speed"] = .int(Int64(speed))
        d["io-status"] = .string(ioStatus.rawValue)
        d["ready"] = .bool(ready)
        d["status"] = .string(status.rawValue)
        d["auto-finalize"] = .bool(autoFinalize)
        d["auto-dismiss"] = .bool(autoDismiss)
        if let error { d["error"] = .string(error) }
        return .dict(d)
    }
}
