import QBlockAPI
import QBlockCore
import QBlockDrivers
import QBlockGraph
import QBlockJobs

/// `drive-mirror` (the target is a file, created unless `mode: existing`) and
/// `blockdev-mirror` (the target is a node), with QEMU 7.2's arguments plus the extension
/// `x-bitmap-file` (a persistent dirty bitmap; see docs/jobs.md). Also registers the
/// `copy-on-read` blockdev driver.
///
/// The handlers read and check the arguments and keep the monitor's books (which nodes a
/// job holds, the target's auto-deletion); the recipe — creating or opening the target,
/// the job, its filter, the pivot — is the library's ``LiveMirror``, the one
/// ``LiveDisk/mirror(to:format:sync:mode:)`` runs.
extension QMPMonitor {
    func registerMirrorCommands() {
        register("drive-mirror") { args, ctx in
            let device = try args.string("device")
            let target = try args.string("target")
            let format = try args.optionalString("format")
            let nodeName = try args.optionalString("node-name")
            let replaces = try args.optionalString("replaces")
            let options = try QMPMirrorArgs(args, device: device).options
            let mode = try args.optionalEnum("mode", ["existing", "absolute-paths"]) ?? "absolute-paths"
            try args.done()
            let source = try QMPJobs.node(ctx.graph, device)
            if replaces != nil && nodeName == nil {
                throw QMPError.generic("a node-name must be provided when replacing a named node of the graph")
            }
            try Self.checkReplaces(replaces, source: source, graph: ctx.graph)
            if let nodeName, ctx.graph.node(named: nodeName) != nil {
                throw QMPError.generic("Duplicate nodes with node-name='\(nodeName)'")
            }
            // The default format is the source's for a new image; an existing one is probed.
            let to: LiveMirrorTarget = mode == "existing"
                ? .existingImage(path: target, format: format, nodeName: nodeName, cache: .writeback)
                : .newImage(path: target, format: format ?? source.skippingFilters.innermostDriver.driverName,
                            nodeName: nodeName, cache: .writeback)
            let started = try await LiveMirror.start(from: source, to: to, options: options, graph: ctx.graph, jobs: ctx.monitor.jobs)
            ctx.monitor.block.holdWhileRunning(started.job, [source, started.target])
            // The target is the job's: unused once the job ends without a pivot, it is closed.
            ctx.monitor.block.setAutoDelete(started.target)
            ctx.monitor.block.inheritOptions(started.target, from: source)
            return .dict(QObject.Dict())
        }
        register("blockdev-mirror") { args, ctx in
            let device = try args.string("device")
            let target = try args.string("target")
            let replaces = try args.optionalString("replaces")
            let filterName = try args.optionalString("filter-node-name")
            var options = try QMPMirrorArgs(args, device: device).options
            try args.done()
            let source = try QMPJobs.node(ctx.graph, device)
            try Self.checkReplaces(replaces, source: source, graph: ctx.graph)
            if let filterName {
                if ctx.graph.node(named: filterName) != nil { throw QMPError.generic("Duplicate nodes with node-name='\(filterName)'") }
                options.filterNodeName = filterName
            }
            let tnode = try QMPJobs.node(ctx.graph, target)
            let started = try await LiveMirror.start(from: source, to: .node(tnode), options: options, graph: ctx.graph,
                                                     jobs: ctx.monitor.jobs)
            ctx.monitor.block.holdWhileRunning(started.job, [source, tnode])
            return .dict(QObject.Dict())
        }
        QMPBlockdevDrivers.register("copy-on-read") { args, ctx in
            let child = try await ctx.child(args, "file")
            let bottomName = try args.optionalString("bottom")
            try args.done()
            // The filter writes what it reads into its child (QEMU refuses a read-only one;
            // checked for -drive style opens, whose trees the filter owns).
            if ctx.ownsChildren && ctx.readOnly {
                throw QMPError.generic("Block node is read-only")
            }
            // `bottom` is the lowest node whose data is still copied (inclusive): the
            // filter stops at its backing node.
            var base: (any BlockDriver)?
            if let name = bottomName {
                guard let n = ctx.graph.node(named: name) else { throw QMPError.noDevice(device: name, node: name) }
                var cur: (any BlockDriver)? = child.skippingFilters
                while let c = cur, !c.isSameNode(as: n) { cur = c.backing?.skippingFilters }
                guard let found = cur else {
                    throw QMPError.generic("Node '\(name)' is not in the backing chain of '\(child.nodeName)'")
                }
                base = found.backing
            }
            return CopyOnReadNode(child: child, base: base, ownsChild: ctx.ownsChildren)
        }
    }

    /// `replaces`: the node the target takes the place of at the pivot. Only the source
    /// itself can be replaced here (QEMU's other case, a quorum child, has no quorum driver
    /// to come from); anything else is refused rather than ignored.
    static func checkReplaces(_ replaces: String?, source: BlockNode, graph: BlockGraph) throws {
        guard let replaces else { return }
        guard let node = graph.node(named: replaces) else {
            throw QMPError.generic("Cannot find device='' nor node-name='\(replaces)'")
        }
        guard node.isSameNode(as: source) else {
            throw QMPError.generic("Replacing node '\(replaces)' is not supported: only the mirror's source can be replaced")
        }
    }
}

/// The arguments `drive-mirror` and `blockdev-mirror` share, read and checked in QEMU's
/// order and words, as the library's ``LiveMirrorOptions``.
struct QMPMirrorArgs {
    let options: LiveMirrorOptions

    init(_ args: QMPArguments, device: String) throws {
        let sync = try args.enumValue("sync", ["top", "full", "none", "incremental", "bitmap"])
        guard let s = MirrorSync(rawValue: sync) else {
            throw QMPError.generic("Sync mode '\(sync)' not supported")
        }
        var granularity: Int64?
        if let g = try args.optionalInt("granularity") {
            if g < 512 || g > (64 << 20) { throw QMPError.generic("Parameter 'granularity' expects a value in range [512B, 64MB]") }
            if g & (g - 1) != 0 { throw QMPError.generic("Parameter 'granularity' expects a power of 2") }
            granularity = g
        }
        var bufSize: Int64 = 16 << 20
        if let b = try args.optionalInt("buf-size") {
            if b <= 0 { throw QMPError.generic("Parameter 'buf-size' must be greater than 0") }
            bufSize = b
        }
        let onSourceError = try QMPJobs.onError(args, "on-source-error")
        let onTargetError = try QMPJobs.onError(args, "on-target-error")
        let unmap = try args.optionalBool("unmap") ?? true
        var copyMode = MirrorCopyMode.background
        if let m = try args.optionalEnum("copy-mode", MirrorCopyMode.allCases.map(\.rawValue)) {
            copyMode = MirrorCopyMode(rawValue: m) ?? .background
        }
        let bitmapFile = try args.optionalString("x-bitmap-file")
        let job = try QMPJobs.options(args, device: device)
        options = LiveMirrorOptions(job: job, sync: s, copyMode: copyMode, granularity: granularity, bufSize: bufSize,
                                    onSourceError: onSourceError, onTargetError: onTargetError, unmap: unmap,
                                    bitmapFile: bitmapFile)
    }
}
