/// A format node that can close while leaving its `file` child open, for a graph where
/// that child is a node of its own (`blockdev-add` with `file` naming another node): the
/// format node writes back and releases everything it owns, and whoever owns the file node
/// closes it. Without this, such a node could only be flushed and dropped, leaving a qcow2
/// image marked dirty and its persistent bitmaps in use.
public protocol FileSharingClose: BlockDriver {
    /// ``BlockDriver/close()``, except that the `file` child stays open.
    func closeLeavingFileOpen() async throws
}
