import QBlockCore
import QBlockGraph
import QBlockOperations
/// The steps of a live external snapshot (QEMU's `blockdev-snapshot`): an overlay image goes
/// on top of a node, with the node as its backing image, and every user of the node moves
/// to the overlay; the old node then only serves reads and is made read-only.
///
/// One recipe for ``LiveDisk/snapshot(to:)`` and QMP's `blockdev-snapshot` and
/// `blockdev-snapshot-sync` (which run the steps inside a transaction):
///
/// 1. ``createOverlayFile(at:above:)`` (sync variant only) and open it, without backing;
/// 2. ``init(old:overlay:graph:)`` checks the overlay can take the node as backing;
/// 3. ``preflush()`` before writers are held, so the flush while they are has little left;
/// 4. with the graph drained: ``prepareDrained()`` (flush; may fail) then ``commitDrained(in:)``
///    (link and switch; cannot fail): the pause a writer sees is a flush and two pointer updates;
/// 5. ``makeBackingReadOnly(cache:)`` once writers run again (QEMU ignores its failure too).
package struct ExternalSnapshot {
    /// The node the overlay goes on top of.
    package let old: BlockNode
    /// The new top.
    let overlay: BlockNode
    /// The overlay's backing link.
    let link: any BackingLinked

    /// Checks that `overlay` can take `old` as its backing image.
    /// - Throws: ``BlockError`` (QEMU's words): `.unsupported` "The overlay does not support
    ///   backing images", `.invalidArgument` "The overlay already has a backing image",
    ///   `.busy` "The overlay is already in use".
    package init(old: BlockNode, overlay: BlockNode, graph: BlockGraph) throws(BlockError) {
        guard overlay !== old, let link = overlay.innermostDriver as? any BackingLinked else {
            throw BlockError(.unsupported, "The overlay does not support backing images", operation: "snapshot")
        }
        if link.backing != nil {
            throw BlockError(.invalidArgument, "The overlay already has a backing image", operation: "snapshot")
        }
        if !graph.backends(of: overlay).isEmpty {
            throw BlockError(.busy, "The overlay is already in use", operation: "snapshot")
        }
        self.old = old
        self.overlay = overlay
        self.link = link
    }

    /// Creates a qcow2 overlay file at `path` whose backing file is `node`'s image, of
    /// `node`'s size (as `qemu-img create -b` would).
    /// - Throws: ``BlockError`` from the creation.
    package static func createOverlayFile(at path: String, above node: BlockNode) async throws {
        try await ImageCreator.create(format: "qcow2", path: path, size: qemuLength(node), options: [],
                                      backingFile: node.filename, backingFormat: node.driverName)
    }

    /// Flushes the node before writers are held.
    package func preflush() async throws {
        try await old.flush()
    }

    /// Writers held: makes the node's content stable before it becomes a backing image.
    package func prepareDrained() async throws {
        try await old.flush()
    }

    /// Writers held: links the overlay to the node and switches the node's users to it.
    package func commitDrained(in graph: BlockGraph) {
        link.setBackingNode(old)
        graph.replace(old, with: overlay)
    }

    /// Makes the old node read-only in place, as QEMU does after a snapshot; a failure
    /// leaves it writable (nothing writes to it any more either way).
    func makeBackingReadOnly(cache: CacheMode) async {
        try? await ImageMode.makeReadOnly(old, cache: cache)
    }
}

/// Making an image node read-only in place (``ReopenableDriver``): the format first, then
/// its file, so that the format never writes to a read-only file.
///
/// (The other direction is ``BlockReopen/readWrite(_:overlay:graph:)``'s fresh open: a
/// qcow2 image opened read-only as a backing file is prepared for writing only by an open.)
enum ImageMode {
    /// Makes the image below any filter and graph wrapper of `node`, and its file, read-only.
    /// Call with no write in flight on the node.
    /// - Throws: ``BlockError``; on failure the node is writable again.
    static func makeReadOnly(_ node: any BlockDriver, cache: CacheMode) async throws {
        let format = node.skippingFilters.innermostDriver
        guard let f = format as? any ReopenableDriver else {
            throw BlockError(.unsupported, "Node '\(format.filename)' (\(format.driverName)) cannot be reopened",
                             operation: "reopen")
        }
        if format.isReadOnly { return }
        try await f.reopen(readOnly: true, cache: cache)
        guard let file = format.file?.innermostDriver as? any ReopenableDriver, !file.isReadOnly else { return }
        do {
            try await file.reopen(readOnly: true, cache: cache)
        } catch {
            try? await f.reopen(readOnly: false, cache: cache)
            throw error
        }
    }
}
