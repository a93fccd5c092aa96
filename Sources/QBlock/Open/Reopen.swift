import QBlockCore
import QBlockDrivers
import QBlockGraph
/// Reopening a read-only image read-write, as a commit into a backing file needs (QEMU's
/// `bdrv_reopen_set_read_only(base, false)`).
///
/// A node's file descriptor and read-only mode are fixed for its lifetime, so reopening
/// makes a new node on the same file, opened read-write, and puts it where the old one
/// was: as the backing node of `overlay`, with the old node's backing chain below it; and,
/// when the old node is a named ``BlockNode`` of `graph`, under the same name for every
/// backend that used it. The old node's image lock is released and the new one takes
/// QEMU's read-write lock. Call it inside a drained section.
public enum BlockReopen {
    /// Reopens `node` read-write (a no-op for a writable node).
    /// - Parameters:
    ///   - node: the image node (qcow2 or raw, possibly inside a ``BlockNode``).
    ///   - overlay: the image whose backing link points at `node` (nil: none).
    ///   - graph: the graph holding `node` when it is a named node.
    /// - Returns: the node now standing in for `node`.
    /// - Throws: ``BlockError`` when the file cannot be opened read-write or locked.
    public static func readWrite(_ node: any BlockDriver, overlay: (any BackingLinked)?, graph: BlockGraph? = nil) async throws -> any BlockDriver {
        if !node.isReadOnly { return node }
        let inner = node.innermostDriver
        let path = inner.filename
        let options = OpenOptions(format: inner.driverName, readOnly: false, openBacking: false, locking: false)
        let fresh = try await ImageOpener.open(path, options: options)
        let below = inner.backing
        // Move the chain below the old node under the new one.
        (inner as? any BackingLinked)?.setBackingNode(nil)
        (fresh as? any BackingLinked)?.setBackingNode(below)
        var replacement: any BlockDriver = fresh
        if let old = node as? BlockNode {
            let named = BlockNode(nodeName: old.nodeName, driver: fresh)
            if let graph {
                graph.forget(old)
                try? graph.add(named)
                graph.replace(old, with: named)
            }
            replacement = named
        }
        overlay?.setBackingNode(replacement)
        try? await inner.close()
        if let f = fresh.file as? any HostStorage ?? (fresh as? any HostStorage) {
            let (perm, shared) = ImageOpener.lockPermissions(format: inner.driverName, options: OpenOptions(readOnly: false))
            // If another process holds the image, the switch stands (the node works in this
            // process) and the caller learns that the lock could not be taken.
            try f.lock(perm: perm, shared: shared)
        }
        return replacement
    }
}

