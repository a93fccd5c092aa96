#if canImport(Glibc)
import Glibc
#endif

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
            _ = try args.optionalString("replaces")
            let common = try QMPMirrorArgs(args, device: device)
            let mode = try args.optionalEnum("mode", ["existing", "absolute-paths"]) ?? "absolute-paths"
            try args.done()
            let source = try QMPJobs.node(ctx.graph, device)
            if let nodeName, ctx.graph.node(named: nodeName) != nil {
                throw QMPError.generic("Duplicate nodes with node-name='\(nodeName)'")
            }
            let fmt = format ?? (mode == "existing" ? nil : source.innermostDriver.driverName)
            var zeroed = false
            if mode == "absolute-paths" {
                var backingName: String?
                var backingFormat: String?
                if common.options.sync != .full, let b = source.backing {
                    backingName = b.innermostDriver.filename
                    backingFormat = b.innermostDriver.driverName
                }
                do {
                    try await ImageCreator.create(format: fmt ?? "qcow2", path: target, size: source.length,
                                                  backingFile: backingName, backingFormat: backingFormat)
                } catch let e as BlockError { throw QMPError.generic(e.message) }
                zeroed = common.options.sync == .full
            }
            let driver: any BlockDriver
            do {
                driver = try await ImageOpener.open(target, options: OpenOptions(format: fmt, readOnly: false, openBacking: false))
            } catch let e as BlockError { throw QMPError.generic(e.message) }
            let tnode = BlockNode(nodeName: nodeName ?? ctx.graph.generateNodeName(), driver: driver)
            var options = common.options
            options.targetIsZeroed = zeroed
            do {
                try ctx.graph.add(tnode)
                try ctx.monitor.startMirror(source: source, target: tnode, options: options, job: common.job)
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
            _ = try args.optionalString("replaces")
            _ = try args.optionalString("filter-node-name")
            let common = try QMPMirrorArgs(args, device: device)
            try args.done()
            let source = try QMPJobs.node(ctx.graph, device)
            let tnode = try QMPJobs.node(ctx.graph, target)
            if tnode === source { throw QMPError.generic("Can't mirror node into itself") }
            try ctx.monitor.startMirror(source: source, target: tnode, options: common.options, job: common.job)
            return .dict(QObject.Dict())
        }
        QMPBlockdevDrivers.register("copy-on-read") { args, ctx in
            let child = try await ctx.child(args, "file")
            let bottom = try args.optionalString("bottom").map { name -> any BlockDriver in
                guard let n = ctx.graph.node(named: name) else { throw QMPError.noDevice(device: name, node: name) }
                return n
            }
            return CopyOnReadNode(child: child, bottom: bottom)
        }
    }

    func startMirror(source: BlockNode, target: BlockNode, options: MirrorOptions, job: JobOptions) throws {
        let driver: MirrorJob
        do { driver = try MirrorJob(source: source, target: target, graph: graph, options: options) }
        catch let e as BlockError { throw QMPError.generic(e.message) }
        _ = try jobs.startForQMP(driver, options: job)
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
        _ = try args.optionalBool("unmap")
        if let m = try args.optionalEnum("copy-mode", MirrorCopyMode.allCases.map(\.rawValue)) {
            options.copyMode = MirrorCopyMode(rawValue: m) ?? .background
        }
        options.bitmapFile = try args.optionalString("x-bitmap-file")
        job = try QMPJobs.options(args, device: device)
    }
}
