import QBlockGraph
extension Qcow2Node {
    /// Replaces the node reads fall through to for unallocated clusters (a live snapshot
    /// sets the old top as the overlay's backing; stream and commit drop or shorten the
    /// chain). The header's backing file name is not changed: callers that want the file
    /// to say the same use ``Rebase/changeBackingFile(of:to:format:)``.
    ///
    /// Call only while no request is in flight on this node (inside a drained section):
    /// a read must not see the backing change half way.
    public func setBackingNode(_ node: (any BlockDriver)?) {
        backingNode = node
    }

    /// Like ``setBackingNode(_:)``, with ``metaLock`` held: a metadata operation in flight
    /// (an allocating write's copy from the backing file) finishes with the old link first.
    public func relinkBacking(to node: (any BlockDriver)?) async {
        await metaLock.withLock { backingNode = node }
    }
}
