import QBlockCore
import QBlockDrivers
import QBlockGraph
import QBlockOperations
/// `block-stream`: copies into an image everything it reads from its backing chain above
/// `base`, then makes `base` its backing file (none without a base), removing the images
/// in between from the chain — at run time and in the image's header (QEMU's `block/stream.c`).
///
/// Copies go through a ``CopyOnReadNode`` over the image; writers that go through the
/// same filter are serialized with the copies, so no copy overwrites newer data.
// @unchecked: `removed` and `link` are only touched with `lock` held; the lets are immutable or
// thread-safe.
public final class StreamJob: FinalizingJobDriver, @unchecked Sendable {
    /// Always ``JobType/stream``.
    public let jobType = JobType.stream
    /// The image being filled.
    public let top: any BackingLinked
    /// The new backing node; nil streams the whole chain.
    public let base: (any BlockDriver)?
    /// The filter copies go through (writers should use it too while the job runs).
    public let filter: CopyOnReadNode
    let backingFile: String?
    let onError: BlockdevOnError
    /// Whether the images dropped from the chain are closed at the end (false when a graph
    /// owns them: the monitor's nodes stay until `blockdev-del`).
    public let closesRemovedImages: Bool
    /// Bytes per copy request (QEMU's `STREAM_CHUNK`).
    static let chunk: Int64 = 512 << 10
    private let lock = PosixMutex()
    private var removed: [any BlockDriver] = []
    private var link: (graph: BlockGraph, top: BlockNode, filter: BlockNode)?

    /// - Parameters:
    ///   - top: the image to stream into (its backing chain must contain `base`).
    ///   - base: the node that stays as backing (`base`/`base-node`); nil: none.
    ///   - backingFile: the name written into the header (`backing-file`); default: the base's file name.
    ///   - filter: the copy-on-read filter to copy through; by default a new one over `top`.
    ///   - onError: `on-error`.
    ///   - closesRemovedImages: close the images dropped from the chain at the end.
    /// - Throws: ``BlockError`` if `base` is not in the backing chain of `top`.
    public init(top: any BackingLinked, base: (any BlockDriver)? = nil, backingFile: String? = nil,
                filter: CopyOnReadNode? = nil, onError: BlockdevOnError = .report, closesRemovedImages: Bool = true) throws {
        if let base, !top.backingChain.dropFirst().contains(where: { $0 === base }) {
            throw BlockError(.invalidArgument, "Node '\(base.filename)' is not a backing image of '\(top.filename)'",
                             operation: "block-stream")
        }
        self.top = top
        self.base = base
        self.backingFile = backingFile
        self.filter = filter ?? CopyOnReadNode(child: top, base: base)
        self.onError = onError
        self.closesRemovedImages = closesRemovedImages
    }

    /// Puts the filter above `node` (the graph node of ``top``) for every user of it, so
    /// that their writes are serialized with the copies; `clean(_:)` takes it out again.
    /// - Parameter name: the filter's node name (`filter-node-name`); default: generated.
    public func insertFilter(into graph: BlockGraph, above node: BlockNode, name: String? = nil) async throws {
        let f = BlockNode(nodeName: name ?? graph.generateNodeName(), driver: filter)
        try await graph.drained {
            try graph.add(f)
            graph.replace(node, with: f)
        }
        lock.withLock { link = (graph, node, f) }
    }

    package func run(_ job: Job) async throws {
        let length = top.length
        job.setProgressTotal(UInt64(length))
        var offset: Int64 = 0
        var firstError: Error?
        while offset < length {
            if job.isCancelled { return }
            let want = min(Self.chunk, length - offset)
            var n = want
            var copied: Int64 = 0
            do {
                let st = try await top.blockStatus(at: offset, length: want)
                n = st.length
                if !st.flags.contains(.allocated) && top.backing != nil {
                    let above = try await ChainStatus.isAllocatedAbove(top.backing, base: base, at: offset, length: n)
                    n = above.length
                    if above.allocated { copied = try await filter.copyOnRead(at: offset, length: n) }
                }
            } catch {
                switch job.errorAction(for: error, isRead: true, policy: onError) {
                case .report: throw error
                case .stop:
                    await job.pausePoint()
                    continue
                case .ignore:
                    if firstError == nil { firstError = error }
                    n = want
                }
            }
            offset += n
            job.progressDone(UInt64(n))
            if copied > 0 { await job.rateLimit(copied) } else { await job.pausePoint() }
        }
        if let firstError { throw firstError }
    }

    /// Drops the streamed images from the chain: the header first (the step that can fail), then the link.
    package func prepare(_ job: Job) async throws {
        try await top.flush()
        let name = base.map { backingFile ?? $0.filename }
        let format = base.map { $0.driverName }
        try await ImageRebase.changeBackingFile(of: top, to: name, format: format)
        var chain: [any BlockDriver] = []
        var cur = top.backing
        while let c = cur, c !== base { chain.append(c); cur = c.backing }
        await top.relinkBacking(to: base)
        lock.withLock { removed = chain }
    }

    package func commit(_ job: Job) async {}
    package func abort(_ job: Job) async {}

    /// Takes the filter out, then closes the images no longer in the chain (without
    /// closing `base` below them).
    package func clean(_ job: Job) async {
        if let l = lock.withLock({ link }) {
            await l.graph.drained {
                l.graph.replace(l.filter, with: l.top)
                l.graph.forget(l.filter)
            }
        }
        let nodes = lock.withLock { removed }
        guard closesRemovedImages, let first = nodes.first else { return }
        if let last = nodes.last as? any BackingLinked { await last.relinkBacking(to: nil) }
        try? await first.close()
    }
}
