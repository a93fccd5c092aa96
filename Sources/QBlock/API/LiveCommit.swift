import QBlockCore
import QBlockGraph
import QBlockJobs

/// The options of a live commit: QMP `block-commit`'s arguments past the device, top and
/// base, and who owns the images that leave the chain. Every member is used; the two that
/// apply to one kind of commit only are refused for the other.
package struct LiveCommitOptions: Sendable {
    /// The job's ID, `speed`, `auto-finalize` and `auto-dismiss`.
    package var job: JobOptions
    /// The backing file name written into the header of the image above the committed ones
    /// (`backing-file`); nil: the base's file name. An intermediate commit only: the active
    /// layer has no image above it.
    package var backingFile: String?
    /// What a read or write error does (`on-error`).
    package var onError: BlockdevOnError
    /// The node name of the filter the job puts above the active layer (`filter-node-name`);
    /// nil: a generated one. An active commit only: an intermediate commit here puts no
    /// filter in the chain (QEMU's `commit_top`), so it has nothing to name.
    package var filterNodeName: String?
    /// Whether an intermediate commit closes the images that leave the chain when it ends:
    /// true for a caller that owns them (``LiveDisk``), false when the graph's owner keeps
    /// them (the monitor). An active commit leaves the old top to its caller either way.
    package var closesRemovedImages: Bool

    /// Creates commit options; every parameter is the property of the same name. The
    /// defaults are `block-commit`'s, with the removed images closed.
    package init(job: JobOptions, backingFile: String? = nil, onError: BlockdevOnError = .report,
                 filterNodeName: String? = nil, closesRemovedImages: Bool = true) {
        self.job = job
        self.backingFile = backingFile
        self.onError = onError
        self.filterNodeName = filterNodeName
        self.closesRemovedImages = closesRemovedImages
    }
}

/// A commit started by ``LiveCommit/start(top:of:base:options:graph:jobs:observe:)``.
package struct LiveCommitJob: Sendable {
    /// The running job.
    package let job: Job
    private let driver: Driver

    private enum Driver: Sendable {
        case active(MirrorJob)
        case intermediate(CommitJob)
    }

    /// Whether this commits the active layer: the job becomes ready, and completing it
    /// switches the users of the top to the base.
    package var isActive: Bool {
        if case .active = driver { return true }
        return false
    }

    /// The node committed into, opened read-write: the active commit's target, or the
    /// intermediate commit's base as its job reopened it (read it once the job has ended).
    package var base: any BlockDriver {
        switch driver {
        case .active(let mirror): return mirror.targetNode
        case .intermediate(let commit): return commit.base
        }
    }

    init(job: Job, active: MirrorJob) {
        self.job = job
        driver = .active(active)
    }

    init(job: Job, intermediate: CommitJob) {
        self.job = job
        driver = .intermediate(intermediate)
    }
}

/// The recipe of a live commit, the one ``LiveDisk/commit(top:base:)`` and QMP's
/// `block-commit` run.
///
/// - The active layer (`top` is the node itself; QEMU's `commit_active_start`): the base is
///   reopened read-write in place and the top mirrored into it (``ActiveCommit``); the job
///   becomes ready, and completing it switches the top's users to the base.
/// - An intermediate image (QEMU's `commit_start`): a ``CommitJob`` writes what the images
///   from `top` down to the base allocate into the base (reopened read-write), then links
///   the image above `top` to the base, in its header and at run time.
package enum LiveCommit {
    /// Starts committing `top` (and the images below it, down to `base`) into `base`.
    /// - Parameters:
    ///   - top: the topmost image committed: `node` itself (the active layer) or a node of
    ///     its backing chain, which must have a backing image.
    ///   - node: the node whose users see the chain (the device).
    ///   - base: the node committed into, below `top`; nil: the bottom of the chain.
    ///   - options: the job's options.
    ///   - graph: the graph holding the nodes and their users.
    ///   - jobs: the registry the job joins.
    ///   - observe: receives the job's events from the first on.
    /// - Returns: the running job.
    /// - Throws: ``BlockError`` (QEMU's words): `.invalidArgument` "Top image has no backing
    ///   file", `backingFile` for the active layer, a duplicate `filterNodeName`, a base not
    ///   below `top`, a bad or used job ID; `.unsupported` for `filterNodeName` with an
    ///   intermediate image, or an image above `top` that cannot change its backing file;
    ///   the base's reopen errors.
    package static func start(top: any BlockDriver, of node: BlockNode, base: (any BlockDriver)?,
                              options: LiveCommitOptions, graph: BlockGraph, jobs: JobManager,
                              observe: (@Sendable (BlockJobEvent) -> Void)? = nil) async throws -> LiveCommitJob {
        guard top.backing != nil else {
            throw BlockError(.invalidArgument, "Top image has no backing file", operation: "block-commit")
        }
        if top.isSameNode(as: node) {
            if options.backingFile != nil {
                throw BlockError(.invalidArgument, "'backing-file' specified, but 'top' is the active layer",
                                 operation: "block-commit")
            }
            if let name = options.filterNodeName, graph.node(named: name) != nil {
                throw BlockError(.invalidArgument, "Duplicate nodes with node-name='\(name)'", operation: "block-commit")
            }
            let driver = try await ActiveCommit.make(top: node, base: base, graph: graph, onError: options.onError,
                                                     filterNodeName: options.filterNodeName)
            let job = try await jobs.launch(driver, options: options.job, observe: observe)
            return LiveCommitJob(job: job, active: driver)
        }
        if options.filterNodeName != nil {
            throw BlockError(.unsupported, "'filter-node-name' is only supported when committing the active layer "
                             + "(an intermediate commit inserts no filter node here)", operation: "block-commit")
        }
        var above: any BlockDriver = node
        while let next = above.backing, !next.isSameNode(as: top) { above = next }
        guard let overlay = above.innermostDriver as? any BackingLinked else {
            throw BlockError(.unsupported, "The overlay of '\(top.filename)' does not support backing images",
                             operation: "block-commit")
        }
        let driver = try CommitJob(overlay: overlay, base: base, backingFile: options.backingFile, graph: graph,
                                   onError: options.onError, closesRemovedImages: options.closesRemovedImages)
        let job = try await jobs.launch(driver, options: options.job, observe: observe)
        return LiveCommitJob(job: job, intermediate: driver)
    }
}
