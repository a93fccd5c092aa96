import QBlockCore
import QBlockDrivers
import QBlockGraph
import QBlockJobs

/// The options of a live stream: QMP `block-stream`'s arguments past the device and the
/// base, and who owns the images that leave the chain. Every member is used.
package struct LiveStreamOptions: Sendable {
    /// The job's ID, `speed`, `auto-finalize` and `auto-dismiss`.
    package var job: JobOptions
    /// The backing file name written into the top image's header (`backing-file`); nil:
    /// the base's file name.
    package var backingFile: String?
    /// What a read error does (`on-error`).
    package var onError: BlockdevOnError
    /// The node name of the copy-on-read filter the job puts above the node
    /// (`filter-node-name`); nil: a generated one.
    package var filterNodeName: String?
    /// Whether the images that leave the chain are closed when the job ends: true for a
    /// caller that owns them (``LiveDisk``), false when the graph's owner keeps them (the
    /// monitor's nodes stay until `blockdev-del`).
    package var closesRemovedImages: Bool

    /// Creates stream options; every parameter is the property of the same name. The
    /// defaults are `block-stream`'s, with the removed images closed.
    package init(job: JobOptions, backingFile: String? = nil, onError: BlockdevOnError = .report,
                 filterNodeName: String? = nil, closesRemovedImages: Bool = true) {
        self.job = job
        self.backingFile = backingFile
        self.onError = onError
        self.filterNodeName = filterNodeName
        self.closesRemovedImages = closesRemovedImages
    }
}

/// The recipe of a live stream (QEMU's `stream_start`), the one ``LiveDisk/stream(base:)``
/// and QMP's `block-stream` run: a ``StreamJob`` copies into the node's image what it reads
/// from its backing chain above the base, through a copy-on-read filter put above the node
/// for every user (so their writes are serialized with the copies); when it ends, the base
/// becomes the image's backing file and the filter goes.
package enum LiveStream {
    /// Starts a stream into `node`'s image.
    /// - Parameters:
    ///   - node: the node whose image is filled (its users go through the filter while the job runs).
    ///   - base: the node of its backing chain that stays as backing image; nil copies the
    ///     whole chain and leaves the image without backing file.
    ///   - options: the job's options.
    ///   - graph: the graph holding `node` and its users.
    ///   - jobs: the registry the job joins.
    ///   - observe: receives the job's events from the first on.
    /// - Returns: the running job.
    /// - Throws: ``BlockError``: `.unsupported` if the image cannot have a backing file,
    ///   `.invalidArgument` if `base` is not below the node or the job ID is bad or in use,
    ///   the filter's insertion errors (a duplicate `filterNodeName`); nothing is left
    ///   behind.
    package static func start(into node: BlockNode, base: (any BlockDriver)?, options: LiveStreamOptions,
                              graph: BlockGraph, jobs: JobManager,
                              observe: (@Sendable (BlockJobEvent) -> Void)? = nil) async throws -> Job {
        guard let top = node.innermostDriver as? any BackingLinked else {
            throw BlockError(.unsupported, "Block format '\(node.driverName)' used by node '\(node.nodeName)' does not support streaming",
                             operation: "block-stream")
        }
        let filter = CopyOnReadNode(child: node, base: base)
        let driver = try StreamJob(top: top, base: base, backingFile: options.backingFile, filter: filter,
                                   onError: options.onError, closesRemovedImages: options.closesRemovedImages)
        return try await jobs.launch(driver, options: options.job, observe: observe) {
            try await driver.insertFilter(into: graph, above: node, name: options.filterNodeName)
        }
    }
}

extension JobManager {
    /// Registers `driver` as a job, lets `setUp` finish setting it up (insert a filter),
    /// and starts it; a job whose setup fails is discarded.
    /// - Returns: the running job.
    /// - Throws: ``BlockError`` for a bad or used job ID; what `setUp` threw.
    package func launch(_ driver: any JobDriver, options: JobOptions, observe: (@Sendable (BlockJobEvent) -> Void)?,
                        setUp: () async throws -> Void = {}) async throws -> Job {
        let job = try create(driver, options: options, observe: observe)
        do {
            try await setUp()
        } catch {
            discard(job)
            throw error
        }
        start(job)
        return job
    }
}
