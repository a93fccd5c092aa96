import QBlockAPI
import QBlockCore
import QBlockGraph
import QBlockJobs

/// `block-stream` and `block-commit` (QEMU 7.2 arguments). The handlers read and check the
/// arguments, find the nodes they name and keep the monitor's books; the recipes are the
/// library's ``LiveStream`` and ``LiveCommit``, the ones ``LiveDisk/stream(base:)`` and
/// ``LiveDisk/commit(top:base:)`` run. The images a job takes out of the chain stay open
/// nodes of the graph, as in QEMU, until `blockdev-del`.
extension QMPMonitor {
    func registerStreamCommand() {
        register("block-stream") { args, ctx in
            let device = try args.string("device")
            let base = try args.optionalString("base")
            let baseNode = try args.optionalString("base-node")
            let backingFile = try args.optionalString("backing-file")
            let onError = try QMPJobs.onError(args, "on-error")
            let filterName = try args.optionalString("filter-node-name")
            let job = try QMPJobs.options(args, device: device)
            try args.done()
            if base != nil && baseNode != nil {
                throw QMPError.generic("'base' and 'base-node' cannot be specified at the same time")
            }
            let node = try QMPJobs.node(ctx.graph, device)
            guard node.innermostDriver is any BackingLinked else {
                throw QMPError.generic("Block format '\(node.driverName)' used by node '\(device)' does not support streaming")
            }
            let baseBD = try QMPJobs.chainNode(node, node: baseNode, file: base, graph: ctx.graph)
            let options = LiveStreamOptions(job: job, backingFile: backingFile, onError: onError, filterNodeName: filterName,
                                            closesRemovedImages: false)
            let started = try await LiveStream.start(into: node, base: baseBD, options: options, graph: ctx.graph,
                                                     jobs: ctx.monitor.jobs)
            ctx.monitor.block.holdWhileRunning(started, [])
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
            let filterName = try args.optionalString("filter-node-name")
            let job = try QMPJobs.options(args, device: device)
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
            let options = LiveCommitOptions(job: job, backingFile: backingFile, onError: onError, filterNodeName: filterName,
                                            closesRemovedImages: false)
            let started = try await LiveCommit.start(top: topBD, of: node, base: baseBD, options: options, graph: ctx.graph,
                                                     jobs: ctx.monitor.jobs)
            ctx.monitor.block.holdWhileRunning(started.job, [])
            return .dict(QObject.Dict())
        }
    }
}
