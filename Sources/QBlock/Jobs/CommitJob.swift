import QBlockCore
import QBlockDrivers
import QBlockGraph
import QBlockOpen
import QBlockOperations
/// `block-commit` of an intermediate image (QEMU's `block/commit.c`): writes what the
/// images from `top` down to, but not including, `base` allocate into `base`, then links
/// the image above `top` directly to `base` (at run time and in its header).
///
/// Committing the active layer is a mirror into the base: see ``MirrorJob``.
// @unchecked: `removed` is only touched with `lock` held; `base` is written only by the job body (one
// task).
public final class CommitJob: FinalizingJobDriver, @unchecked Sendable {
    /// Always ``JobType/commit``.
    public let jobType = JobType.commit
    /// The image above `top`, whose backing link changes.
    public let overlay: any BackingLinked
    /// The topmost image committed.
    public let top: any BlockDriver
    /// The image committed into; replaced by a read-write reopened node when it was read-only.
    public private(set) var base: any BlockDriver
    let graph: BlockGraph?
    let backingFile: String?
    let onError: BlockdevOnError
    /// Whether the images dropped from the chain are closed at the end (false when a graph
    /// owns them: the monitor's nodes stay until `blockdev-del`).
    public let closesRemovedImages: Bool
    /// Bytes per copy request (QEMU's `COMMIT_BUFFER_SIZE`).
    static let chunk: Int64 = 512 << 10
    private let lock = PosixMutex()
    private var removed: [any BlockDriver] = []

    /// - Parameters:
    ///   - overlay: the image whose backing file is `top`.
    ///   - base: an image below `top` in the chain (default: the deepest, as QEMU's).
    ///   - backingFile: the name written into the overlay's header; default: the base's file name.
    ///   - graph: the graph holding the nodes, for reopening `base` read-write.
    ///   - onError: `on-error`.
    ///   - closesRemovedImages: close the images dropped from the chain at the end.
    /// - Throws: ``BlockError`` if `top` has no backing file or `base` is not below it.
    public init(overlay: any BackingLinked, base: (any BlockDriver)? = nil, backingFile: String? = nil,
                graph: BlockGraph? = nil, onError: BlockdevOnError = .report, closesRemovedImages: Bool = true) throws {
        guard let top = overlay.backing else {
            throw BlockError(.invalidArgument, "Top image has no backing file", operation: "block-commit")
        }
        guard let b = base ?? (top.backing == nil ? nil : top.backingChain.last) else {
            throw BlockError(.invalidArgument, "Top image '\(top.filename)' has no backing file", operation: "block-commit")
        }
        guard top.backingChain.dropFirst().contains(where: { $0 === b }) else {
            throw BlockError(.invalidArgument, "Base '\(b.filename)' not found", operation: "block-commit")
        }
        self.overlay = overlay
        self.top = top
        self.base = b
        self.graph = graph
        self.backingFile = backingFile
        self.onError = onError
        self.closesRemovedImages = closesRemovedImages
    }

    package func run(_ job: Job) async throws {
        // The node just above base: its backing link moves to the reopened base.
        var above: any BlockDriver = top
        while let next = above.backing, next !== base { above = next }
        let overlayOfBase = above.innermostDriver as? any BackingLinked
        if let graph {
            base = try await graph.drained { try await BlockReopen.readWrite(base, overlay: overlayOfBase, graph: graph) }
        } else {
            base = try await BlockReopen.readWrite(base, overlay: overlayOfBase)
        }
        let length = top.length
        if base.length < length { try await base.truncate(to: length, preallocation: .off) }
        job.setProgressTotal(UInt64(length))
        let buf = AlignedBuffer(count: Int(Self.chunk))
        var offset: Int64 = 0
        while offset < length {
            if job.isCancelled { return }
            let want = min(Self.chunk, length - offset)
            var n = want
            var copied: Int64 = 0
            var isRead = true
            do {
                let st = try await ChainStatus.isAllocatedAbove(top, base: base, at: offset, length: want)
                n = st.length
                if st.allocated {
                    try await buf.withUnsafeMutableBytes { b in
                        let part = UnsafeMutableRawBufferPointer(rebasing: b[0..<Int(n)])
                        try await top.read(at: offset, into: part)
                        isRead = false
                        if part.allSatisfy({ $0 == 0 }) {
                            try await base.writeZeroes(at: offset, length: n, flags: [])
                        } else {
                            try await base.write(at: offset, from: UnsafeRawBufferPointer(part), flags: [])
                        }
                    }
                    copied = n
                }
            } catch {
                switch job.errorAction(for: error, isRead: isRead, policy: onError) {
                case .report: throw error
                case .stop:
                    await job.pausePoint()
                    continue
                case .ignore:
                    n = want
                }
            }
            offset += n
            job.progressDone(UInt64(n))
            if copied > 0 { await job.rateLimit(copied) } else { await job.pausePoint() }
        }
        try await base.flush()
    }

    /// Links the overlay to the base: header first (the step that can fail), then the link.
    package func prepare(_ job: Job) async throws {
        let inner = base.innermostDriver
        try await ImageRebase.changeBackingFile(of: overlay, to: backingFile ?? inner.filename, format: inner.driverName)
        var chain: [any BlockDriver] = []
        var cur: (any BlockDriver)? = top
        while let c = cur, c !== base { chain.append(c); cur = c.backing }
        overlay.setBackingNode(base)
        lock.withLock { removed = chain }
    }

    package func commit(_ job: Job) async {}
    package func abort(_ job: Job) async {}

    /// Closes the images no longer in the chain (without closing `base` below them).
    package func clean(_ job: Job) async {
        let nodes = lock.withLock { removed }
        guard closesRemovedImages, let first = nodes.first else { return }
        if let last = nodes.last?.innermostDriver as? any BackingLinked { last.setBackingNode(nil) }
        try? await first.close()
    }
}
