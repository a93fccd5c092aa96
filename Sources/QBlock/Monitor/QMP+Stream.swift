import QBlockCore
import QBlockDrivers
import QBlockGraph
import QBlockJobs
/// `block-stream` and `block-commit` (QEMU 7.2 arguments).
extension QMPMonitor {
    func registerStreamCommand() {
        register("block-stream") { args, ctx in
            let device = try args.string("device")
            let base = try args.optionalString("base")
            let baseNode = try args.optionalString("base-node")
            let backingFile = try args.optionalString("backing-file")
            let onError = try QMPJobs.onError(args, "on-error")
            let filterName = try args.optionalString("filter-node-name")
            let options = try QMPJobs.options(args, device: device)
            try args.done()
            if base != nil && baseNode != nil {
                throw QMPError.generic("'base' and 'base-node' cannot be specified at the same time")
            }
            let node = try QMPJobs.node(ctx.graph, device)
            guard let top = node.innermostDriver as? any BackingLinked else {
                throw QMPError.generic("Block format '\(node.driverName)' used by node '\(device)' does not support streaming")
            }
            let baseBD = try QMPJobs.chainNode(node, node: baseNode, file: base, graph: ctx.graph)
            let filter = CopyOnReadNode(child: node, base: baseBD)
            let stream: StreamJob
            do {
                stream = try StreamJob(top: top, base: baseBD, backingFile: backingFile, filter: filter, onError: onError,
                                       closesRemovedImages: false)
            } catch let e as BlockError { throw QMPError.generic(e.message) }
            let job = try ctx.monitor.jobs.createForQMP(stream, options: options)
            do { try await stream.insertFilter(into: ctx.graph, above: node, name: filterName) }
            catch { ctx.monitor.jobs.discard(job); throw QMPError.from(error) }
            ctx.monitor.jobs.start(job)
            ctx.monitor.block.holdWhileRunning(job, [])
            return .dict(QObject.Dict())
        }
    }

    func registerCommitCommand() {
        register("block-commit") { args, ctx in
            let device = try args.string("device")
            let baseNode = try args.optionalString("base-node")
            let base = try args.optionalString("base")
            let topNode = try args.optionalString("top-node")
            let top = try args.optionalString("top")
            let backingFile = try args.optionalString("backing-file")
            let onError = try QMPJobs.onError(args, "on-error")
            _ = try args.optionalString("filter-node-name")
            let options = try QMPJobs.options(args, device: device)
            try args.done()
            if base != nil && baseNode != nil {
                throw QMPError.generic("'base' and 'base-node' cannot be specified at the same time")
            }
            if top != nil && topNode != nil {
                throw QMPError.generic("'top' and 'top-node' cannot be specified at the same time")
            }
            let node = try QMPJobs.node(ctx.graph, device)
            var topBD: any BlockDriver = node
            if topNode != nil || top != nil {
                if let t = topNode, ctx.graph.node(named: t) === node {
                    topBD = node
                } else if let t = try QMPJobs.chainNode(node, node: topNode, file: top, graph: ctx.graph) {
                    topBD = t
                }
            }
            guard topBD.backing != nil else { throw QMPError.generic("Top image has no backing file") }
            let baseBD = try QMPJobs.chainNode(topBD, node: baseNode, file: base, graph: ctx.graph)
            if topBD === node {
                // The active layer: a mirror into the base.
                let driver: MirrorJob
                do { driver = try await ActiveCommit.make(top: node, base: baseBD, graph: ctx.graph, onError: onError) }
                catch let e as BlockError { throw QMPError.generic(e.message) }
                let job = try ctx.monitor.jobs.startForQMP(driver, options: options)
                ctx.monitor.block.holdWhileRunning(job, [])
            } else {
                var overlay: any BlockDriver = node
                while let b = overlay.backing, b !== topBD { overlay = b }
                guard let q = overlay.innermostDriver as? any BackingLinked else {
                    throw QMPError.generic("The overlay of '\(topBD.filename)' does not support backing images")
                }
                let commit: CommitJob
                do {
                    commit = try CommitJob(overlay: q, base: baseBD, backingFile: backingFile, graph: ctx.graph, onError: onError,
                                           closesRemovedImages: false)
                } catch let e as BlockError { throw QMPError.generic(e.message) }
                let job = try ctx.monitor.jobs.startForQMP(commit, options: options)
                ctx.monitor.block.holdWhileRunning(job, [])
            }
            return .dict(QObject.Dict())
        }
    }
}

extension JobManager {
    /// Registers a job for a QMP command (errors in QMP's words), not started yet.
    func createForQMP(_ driver: any JobDriver, options: JobOptions) throws -> Job {
        do { return try create(driver, options: options) } catch let e as BlockError { throw QMPError.generic(e.message) }
    }

    /// Registers and starts a job for a QMP command.
    @discardableResult
    func startForQMP(_ driver: any JobDriver, options: JobOptions) throws -> Job {
        let job = try createForQMP(driver, options: options)
        start(job)
        return job
    }
}
