#if canImport(Glibc)
import Glibc
#endif
import QBlockCore
import QBlockDrivers
import QBlockGraph
import QBlockJobs
import QBlockOpen
import QBlockOperations

/// `drive-mirror` (the target is a file, created unless `mode: existing`) and
/// `blockdev-mirror` (the target is a node), with QEMU 7.2's arguments plus the extension
/// `x-bitmap-file` (a persistent dirty bitmap; see docs/jobs.md). Also registers the
/// `copy-on-read` blockdev driver.
extension QMPMonitor {
    func registerMirrorCommands() {
        register("drive-mirror") { args, ctx in
            let device = try args.string("device")
            let target = try args.string("target")
            let format = try args.optionalString("format")
            let nodeName = try args.optionalString("node-name")
            let replaces = try args.optionalString("replaces")
            let common = try QMPMirrorArgs(args, device: device)
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
            let fmt = format ?? (mode == "existing" ? nil : source.skippingFilters.innermostDriver.driverName)
            var options = common.options
            // What the target continues into (QEMU's target_backing_bs): the source's
            // backing node for sync=top (full when there is none), the source itself for
            // sync=none, nothing for sync=full.
            var targetBacking: (any BlockDriver)?
            switch options.sync {
            case .full: targetBacking = nil
            case .top:
                targetBacking = source.skippingFilters.backing
                if targetBacking == nil { options.sync = .full }
            case .none: targetBacking = source
            }
            var zeroed = false
            if mode == "absolute-paths" {
                let backing = targetBacking?.skippingFilters.innermostDriver
                do {
                    try await ImageCreator.create(format: fmt ?? "qcow2", path: target, size: source.length,
                                                  backingFile: backing?.filename, backingFormat: backing?.driverName)
                } catch let e as BlockError { throw QMPError.generic(e.message) }
                zeroed = options.sync == .full
            }
            let driver: any BlockDriver
            do {
                driver = try await ImageOpener.open(target, options: OpenOptions(format: fmt, readOnly: false, openBacking: false))
            } catch let e as BlockError { throw QMPError.generic(e.message) }
            if mode == "existing", let wanted = targetBacking {
                // QEMU opens the existing target's own backing file at the pivot. Ours links
                // the node of the source's chain that is that file; another file would be a
                // second, unsynchronized opening of an image in use, so it is refused.
                let recorded = (driver as? any BackingLinked)?.backingFileName
                targetBacking = recorded.flatMap { name in
                    Self.chainNode(of: source, matching: ImageOpener.resolveBackingPath(name, relativeTo: target))
                }
                if recorded != nil && targetBacking == nil {
                    try? await driver.close()
                    throw QMPError.generic("The backing file of '\(target)' is not an image of the source's backing chain")
                }
                if recorded == nil { targetBacking = nil }
                _ = wanted
            }
            options.targetBacking = targetBacking
            let tnode = BlockNode(nodeName: nodeName ?? ctx.graph.generateNodeName(), driver: driver)
            options.targetIsZeroed = zeroed
            do {
                try ctx.graph.add(tnode)
                try ctx.monitor.startMirror(source: source, target: tnode, options: options, job: common.job)
                // The target is the job's: unused once the job ends without a pivot, it is closed.
                ctx.monitor.block.setAutoDelete(tnode)
                ctx.monitor.block.inheritOptions(tnode, from: source)
            } catch {
                ctx.graph.forget(tnode)
                try? await driver.close()
                throw QMPError.from(error)
            }
            return .dict(QObject.Dict())
        }
        register("blockdev-mirror") { args, ctx in
            let device = try args.string("device")
            let target = try args.string("target")
            let replaces = try args.optionalString("replaces")
            let filterName = try args.optionalString("filter-node-name")
            var common = try QMPMirrorArgs(args, device: device)
            try args.done()
            let source = try QMPJobs.node(ctx.graph, device)
            try Self.checkReplaces(replaces, source: source, graph: ctx.graph)
            if let filterName {
                if ctx.graph.node(named: filterName) != nil { throw QMPError.generic("Duplicate nodes with node-name='\(filterName)'") }
                common.options.filterNodeName = filterName
            }
            let tnode = try QMPJobs.node(ctx.graph, target)
            if tnode === source { throw QMPError.generic("Can't mirror node into itself") }
            try ctx.monitor.startMirror(source: source, target: tnode, options: common.options, job: common.job)
            return .dict(QObject.Dict())
        }
        QMPBlockdevDrivers.register("copy-on-read") { args, ctx in
            let child = try await ctx.child(args, "file")
            let bottomName = try args.optionalString("bottom")
            try args.done()
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
            return CopyOnReadNode(child: child, base: base)
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

    /// The node of `source`'s backing chain (the source included) whose image file is `path`.
    static func chainNode(of source: BlockNode, matching path: String) -> (any BlockDriver)? {
        func canonical(_ p: String) -> String {
            guard let r = realpath(p, nil) else { return p }
            defer { free(r) }
            return String(cString: r)
        }
        let want = canonical(path)
        var cur: (any BlockDriver)? = source
        while let c = cur {
            if canonical(c.skippingFilters.innermostDriver.filename) == want { return c }
            cur = c.skippingFilters.backing
        }
        return nil
    }

    func startMirror(source: BlockNode, target: BlockNode, options: MirrorOptions, job: JobOptions) throws {
        let driver: MirrorJob
        do { driver = try MirrorJob(source: source, target: target, graph: graph, options: options) }
        catch let e as BlockError { throw QMPError.generic(e.message) }
        let started = try jobs.startForQMP(driver, options: job)
        block.holdWhileRunning(started, [source, target])
    }
}

/// The arguments `drive-mirror` and `blockdev-mirror` share.
struct QMPMirrorArgs {
    var options = MirrorOptions()
    var job: JobOptions

    init(_ args: QMPArguments, device: String) throws {
        let sync = try args.enumValue("sync", ["top", "full", "none", "incremental", "bitmap"])
        guard let s = MirrorSync(rawValue: sync) else {
            throw QMPError.generic("Sync mode '\(sync)' not supported")
        }
        options.sync = s
        if let g = try args.optionalInt("granularity") {
            if g < 512 || g > (64 << 20) { throw QMPError.generic("Parameter 'granularity' expects a value in range [512B, 64MB]") }
            if g & (g - 1) != 0 { throw QMPError.generic("Parameter 'granularity' expects a power of 2") }
            options.granularity = g
        }
        if let b = try args.optionalInt("buf-size") {
            if b <= 0 { throw QMPError.generic("Parameter 'buf-size' must be greater than 0") }
            options.bufSize = b
        }
        options.onSourceError = try QMPJobs.onError(args, "on-source-error")
        options.onTargetError = try QMPJobs.onError(args, "on-target-error")
        options.unmap = try args.optionalBool("unmap") ?? true
        if let m = try args.optionalEnum("copy-mode", MirrorCopyMode.allCases.map(\.rawValue)) {
            options.copyMode = MirrorCopyMode(rawValue: m) ?? .background
        }
        options.bitmapFile = try args.optionalString("x-bitmap-file")
        job = try QMPJobs.options(args, device: device)
    }
}
