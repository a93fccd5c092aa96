#if canImport(Glibc)
import Glibc
#endif
import QBlockCore
import QBlockDrivers
import QBlockGraph
import QBlockJobs
import QBlockOpen
import QBlockOperations

/// The options of a live mirror: the arguments `drive-mirror` and `blockdev-mirror` share
/// past the source and target (with the extension `x-bitmap-file`). Every member is used.
package struct LiveMirrorOptions: Sendable {
    /// The job's ID, `speed`, `auto-finalize` and `auto-dismiss`.
    package var job: JobOptions
    /// What to copy (`sync`).
    package var sync: MirrorSync
    /// Whether writers wait for their copy to the target (`copy-mode`).
    package var copyMode: MirrorCopyMode
    /// Bytes per dirty bit (`granularity`); nil: chosen from the target's cluster size.
    package var granularity: Int64?
    /// Bytes copied at once at most (`buf-size`).
    package var bufSize: Int64
    /// What a read error on the source does (`on-source-error`).
    package var onSourceError: BlockdevOnError
    /// What a write error on the target does (`on-target-error`).
    package var onTargetError: BlockdevOnError
    /// Whether areas reading as zeros may be deallocated on the target (`unmap`).
    package var unmap: Bool
    /// A persistent dirty bitmap in a side file (`x-bitmap-file`), for finishing the mirror
    /// offline after a crash; nil: none.
    package var bitmapFile: String?
    /// The node name of the filter the job puts above the source (`filter-node-name`); nil:
    /// a generated one.
    package var filterNodeName: String?

    /// Creates mirror options; every parameter is the property of the same name. The
    /// defaults are `drive-mirror`'s: a full background copy, granularity from the target,
    /// a 16 MiB buffer, errors reported, zeros unmapped.
    package init(job: JobOptions, sync: MirrorSync = .full, copyMode: MirrorCopyMode = .background,
                 granularity: Int64? = nil, bufSize: Int64 = 16 << 20, onSourceError: BlockdevOnError = .report,
                 onTargetError: BlockdevOnError = .report, unmap: Bool = true, bitmapFile: String? = nil,
                 filterNodeName: String? = nil) {
        self.job = job
        self.sync = sync
        self.copyMode = copyMode
        self.granularity = granularity
        self.bufSize = bufSize
        self.onSourceError = onSourceError
        self.onTargetError = onTargetError
        self.unmap = unmap
        self.bitmapFile = bitmapFile
        self.filterNodeName = filterNodeName
    }
}

/// Where a live mirror writes.
package enum LiveMirrorTarget: Sendable {
    /// A new image file (`drive-mirror` with mode `absolute-paths`, ``LiveDisk/mirror(to:format:sync:mode:)``):
    /// created at `path` in `format` with the source's size and, for sync `top` / `none`,
    /// the source's backing image / the source as its backing file; opened read-write
    /// with `cache` as node `nodeName` (nil: generated). The target continues into that
    /// node of the source's chain when the job completes.
    case newImage(path: String, format: String, nodeName: String?, cache: CacheMode)
    /// An image file as it is (`drive-mirror` with mode `existing`), of format `format`
    /// (nil: probed). For sync `top` / `none`, a backing file it names must be an image of
    /// the source's chain (the node the target continues into when the job completes).
    case existingImage(path: String, format: String?, nodeName: String?, cache: CacheMode)
    /// A node of the graph (`blockdev-mirror`): its backing link is left as it is.
    case node(BlockNode)
}

/// A mirror started by ``LiveMirror/start(from:to:options:graph:jobs:observe:)``.
package struct LiveMirrorJob: Sendable {
    /// The running job.
    package let job: Job
    /// The target node: the one given, or the image the operation opened and added to
    /// the graph (the job's then: its caller closes it if the job ends without a switch).
    package let target: BlockNode
}

/// The recipe of a live mirror (QEMU's `drive-mirror`, `blockdev-mirror`), the one
/// ``LiveDisk/mirror(to:format:sync:mode:)`` and the monitor run: the target is created or
/// opened as ``LiveMirrorTarget`` says and added to the graph, then a ``MirrorJob`` puts its
/// filter above the source, copies what the sync mode asks for, becomes ready, and on
/// completion switches every user of the source to the target.
package enum LiveMirror {
    /// Starts mirroring `source` into `target`.
    /// - Parameters:
    ///   - source: the node copied (its users go through the mirror's filter while the job runs).
    ///   - target: where the copy goes.
    ///   - options: the job's options.
    ///   - graph: the graph holding `source` and its users.
    ///   - jobs: the registry the job joins.
    ///   - observe: receives the job's events from the first on.
    /// - Returns: the running job and its target node.
    /// - Throws: ``BlockError``: "Can't mirror node into itself", creation and open errors
    ///   (a created file is left in place, as QEMU leaves it), an existing target whose
    ///   backing file is not in the source's chain, the job's checks (sizes, granularity,
    ///   buffer size), a bad or used job ID. A target the operation opened is closed and
    ///   taken out of the graph again.
    package static func start(from source: BlockNode, to target: LiveMirrorTarget, options: LiveMirrorOptions,
                              graph: BlockGraph, jobs: JobManager,
                              observe: (@Sendable (BlockJobEvent) -> Void)? = nil) async throws -> LiveMirrorJob {
        var mirror = MirrorOptions(sync: options.sync, copyMode: options.copyMode, granularity: options.granularity,
                                   bufSize: options.bufSize, onSourceError: options.onSourceError,
                                   onTargetError: options.onTargetError, bitmapFile: options.bitmapFile)
        mirror.unmap = options.unmap
        mirror.filterNodeName = options.filterNodeName
        let path: String, format: String?, nodeName: String?, cache: CacheMode, creates: Bool
        switch target {
        case .node(let node):
            if node === source { throw BlockError(.invalidArgument, "Can't mirror node into itself", operation: "mirror") }
            let job = try await jobs.launch(MirrorJob(source: source, target: node, graph: graph, options: mirror),
                                            options: options.job, observe: observe)
            return LiveMirrorJob(job: job, target: node)
        case .newImage(let p, let f, let n, let c): (path, format, nodeName, cache, creates) = (p, f, n, c, true)
        case .existingImage(let p, let f, let n, let c): (path, format, nodeName, cache, creates) = (p, f, n, c, false)
        }
        // What the target continues into (QEMU's target_backing_bs): the source's backing
        // node for sync=top (a full copy when there is none), the source itself for
        // sync=none, nothing for sync=full.
        switch mirror.sync {
        case .full: mirror.targetBacking = nil
        case .top:
            mirror.targetBacking = source.skippingFilters.backing
            if mirror.targetBacking == nil { mirror.sync = .full }
        case .none: mirror.targetBacking = source
        }
        if creates {
            let backing = mirror.targetBacking?.skippingFilters.innermostDriver
            try await ImageCreator.create(format: format ?? "qcow2", path: path, size: source.length,
                                          backingFile: backing?.filename, backingFormat: backing?.driverName)
            mirror.targetIsZeroed = mirror.sync == .full
        }
        let driver = try await ImageOpener.open(path, options: OpenOptions(format: format, readOnly: false, cache: cache,
                                                                           openBacking: false))
        if !creates, mirror.targetBacking != nil {
            // QEMU opens the existing target's own backing file at the pivot. Ours links
            // the node of the source's chain that is that file; another file would be a
            // second, unsynchronized opening of an image in use, so it is refused.
            let recorded = (driver as? any BackingLinked)?.backingFileName
            mirror.targetBacking = recorded.flatMap { name in
                chainNode(of: source, matching: ImageOpener.resolveBackingPath(name, relativeTo: path))
            }
            if recorded != nil && mirror.targetBacking == nil {
                try? await driver.close()
                throw BlockError(.invalidArgument, "The backing file of '\(path)' is not an image of the source's backing chain",
                                 path: path, operation: "mirror")
            }
        }
        let node = BlockNode(nodeName: nodeName ?? graph.generateNodeName(), driver: driver)
        do {
            try graph.add(node)
            let job = try await jobs.launch(MirrorJob(source: source, target: node, graph: graph, options: mirror),
                                            options: options.job, observe: observe)
            return LiveMirrorJob(job: job, target: node)
        } catch {
            graph.forget(node)
            try? await driver.close()
            throw error
        }
    }

    /// The node of `source`'s backing chain (the source included) whose image file is `path`.
    static func chainNode(of source: BlockNode, matching path: String) -> (any BlockDriver)? {
        let want = LiveDisk.canonical(path)
        var cur: (any BlockDriver)? = source
        while let c = cur {
            if LiveDisk.canonical(c.skippingFilters.innermostDriver.filename) == want { return c }
            cur = c.skippingFilters.backing
        }
        return nil
    }
}
