#if canImport(Glibc)
import Glibc
#endif
import QBlockCore
import QBlockDrivers
import QBlockGraph
import QBlockJobs
import QBlockOpen
import QBlockOperations

/// The live operations: each is one method, with QEMU's semantics.
extension LiveDisk {
    /// Takes a live external snapshot (QEMU's `blockdev-snapshot-sync`): creates a qcow2
    /// overlay at `path` on top of the current image, and switches the user to it. The old
    /// top becomes the overlay's backing image and is made read-only; it keeps the disk's
    /// content as of this moment.
    ///
    /// Writers are held only while the old top is flushed and the link switched.
    /// - Parameter path: the new overlay; it must not exist.
    /// - Returns: the new top of the chain.
    /// - Throws: ``BlockError``: `.invalidArgument` if `path` exists, `.busy` while a job
    ///   runs, `.closed`, creation and I/O errors (the disk then stays as it was).
    @discardableResult
    public func snapshot(to path: String) async throws(BlockError) -> ImageLayer {
        try await exclusive("snapshot") {
            if access(path, F_OK) == 0 {
                throw BlockError(.invalidArgument, "'\(path)' already exists", path: path, operation: "snapshot")
            }
            let old = top
            try await ExternalSnapshot.createOverlayFile(at: path, above: old)
            let overlay: BlockNode
            do {
                let driver = try await ImageOpener.open(path, options: OpenOptions(format: "qcow2", readOnly: false,
                                                                                   cache: cache, openBacking: false))
                overlay = BlockNode(nodeName: graph.generateNodeName(), driver: driver)
            } catch {
                unlink(path)
                throw error
            }
            do {
                let snapshot = try ExternalSnapshot(old: old, overlay: overlay, graph: graph)
                try graph.add(overlay)
                try await snapshot.preflush()
                try await graph.drained {
                    try await snapshot.prepareDrained()
                    snapshot.commitDrained(in: graph)
                }
                await snapshot.makeBackingReadOnly(cache: cache)
            } catch {
                graph.forget(overlay)
                try? await overlay.close()
                unlink(path)
                throw error
            }
            guard let layer = ImageLayer(overlay) else {
                throw BlockError(.internalError, "The overlay is not an image", path: path, operation: "snapshot")
            }
            return layer
        }
    }

    /// Streams into the top image everything it reads from its backing chain above `base`,
    /// then makes `base` its backing image (QEMU's `block-stream`); the images in between
    /// leave the chain and are closed. The user keeps reading and writing meanwhile.
    /// (The recipe is ``LiveStream``'s, the one QMP's `block-stream` runs.)
    /// - Parameter base: the backing image that stays (its path, as in ``ImageLayer/path``);
    ///   nil copies the whole chain and leaves the top without backing image.
    /// - Returns: the job; it has no ready phase: await ``BlockJobHandle/finished()``.
    /// - Throws: ``BlockError``: `.notFound` if `base` is not below the top, `.unsupported`
    ///   if the top image cannot have a backing file, `.busy`, `.closed`.
    public func stream(base: String? = nil) async throws(BlockError) -> BlockJobHandle {
        try await exclusive("stream") {
            let node = top
            let baseNode = try base.map { try chainNode($0, in: node, excludingTop: true) }
            return try await launch(kind: .stream, hasReadyPhase: false) { job, observe in
                let started = try await LiveStream.start(into: node, base: baseNode, options: LiveStreamOptions(job: job),
                                                         graph: self.graph, jobs: self.jobs, observe: observe)
                return (started, settle: {})
            }
        }
    }

    /// Commits the images from `top` down to (not including) `base` into `base`, and takes
    /// them out of the chain (QEMU's `block-commit`; the recipe is ``LiveCommit``'s, the
    /// one QMP's `block-commit` runs).
    ///
    /// Committing the active image (`top` nil) is a mirror into `base`: the job becomes
    /// ready, and ``BlockJobHandle/complete()`` switches the user to `base`. Committing a
    /// backing image just finishes. Images that leave the chain are closed.
    /// - Parameters:
    ///   - top: the topmost image to commit (a path of the chain); nil: the active image.
    ///   - base: the image to commit into; nil: the bottom of the chain.
    /// - Returns: the job; see ``BlockJobHandle/hasReadyPhase``.
    /// - Throws: ``BlockError``: `.notFound` for images not in the chain, `.invalidArgument`
    ///   if `top` has no backing image, `.busy`, `.closed`.
    public func commit(top topPath: String? = nil, base: String? = nil) async throws(BlockError) -> BlockJobHandle {
        try await exclusive("commit") {
            let node = top
            let topNode = try topPath.map { try chainNode($0, in: node, excludingTop: false) } ?? node
            guard topNode.backing != nil else {
                throw BlockError(.invalidArgument, "Top image has no backing file", operation: "commit")
            }
            let baseNode = try base.map { try chainNode($0, in: topNode, excludingTop: true) }
            let cache = self.cache
            let active = topNode.isSameNode(as: node)
            return try await launch(kind: .commit, hasReadyPhase: active) { job, observe in
                let commit = try await LiveCommit.start(top: topNode, of: node, base: baseNode,
                                                        options: LiveCommitOptions(job: job),
                                                        graph: self.graph, jobs: self.jobs, observe: observe)
                return (commit.job, settle: { [self] in
                    let target = commit.base
                    if commit.isActive, self.top === target {
                        await retire(node)
                    } else {
                        // A backing image again (an intermediate commit's base, or an active
                        // commit's that did not switch): read-only, as before the commit.
                        try? await ImageMode.makeReadOnly(target, cache: cache)
                    }
                })
            }
        }
    }

    /// Mirrors the disk into a new image at `path` (QEMU's `drive-mirror`; the recipe is
    /// ``LiveMirror``'s, the one QMP's `drive-mirror` and `blockdev-mirror` run): the job
    /// copies what `sync` asks for, then every write the user makes, and becomes ready once
    /// both match. ``BlockJobHandle/complete()`` then switches the user to the copy (the old
    /// chain is closed); ``BlockJobHandle/cancel(_:)`` with ``JobCancelMode/keepCopy``
    /// leaves a consistent copy without switching.
    /// - Parameters:
    ///   - path: the target; it must not exist.
    ///   - format: the target's format.
    ///   - sync: what to copy: the whole disk (`.full`), the top image with the target
    ///     backed by the top's backing image (`.top`), or only new writes with the target
    ///     backed by the current top (`.none`; qcow2 targets only for `.top` and `.none`).
    ///   - mode: whether writes wait for their copy (`.writeBlocking`, the mirror then
    ///     always converges) or are copied later (`.background`).
    /// - Returns: the job; await ``BlockJobHandle/ready()``.
    /// - Throws: ``BlockError``: `.invalidArgument` if `path` exists, creation errors, `.busy`, `.closed`.
    public func mirror(to path: String, format: ImageFormat = .qcow2, sync: MirrorSync = .full,
                       mode: MirrorCopyMode = .background) async throws(BlockError) -> BlockJobHandle {
        try await exclusive("mirror") {
            if access(path, F_OK) == 0 {
                throw BlockError(.invalidArgument, "'\(path)' already exists", path: path, operation: "mirror")
            }
            let source = top
            let target = LiveMirrorTarget.newImage(path: path, format: format.rawValue, nodeName: nil, cache: cache)
            do {
                return try await launch(kind: .mirror, hasReadyPhase: true) { job, observe in
                    let mirror = try await LiveMirror.start(from: source, to: target,
                                                            options: LiveMirrorOptions(job: job, sync: sync, copyMode: mode),
                                                            graph: self.graph, jobs: self.jobs, observe: observe)
                    return (mirror.job, settle: { [self] in
                        // Switched: the old chain goes (down to what the target shares); else the target.
                        await retire(self.top === mirror.target ? source : mirror.target)
                    })
                }
            } catch {
                // The file did not exist: whatever is there now is this call's.
                unlink(path)
                throw error
            }
        }
    }
}
