import QBlockCore
import QBlockGraph
/// The capability protocols a raw node has (`Graph/Capabilities.swift`).
extension RawNode: PassThroughFormat {
    /// The node raw passes I/O straight through to (its file), for callers that look
    /// through format layers that do not change data.
    public var passedThrough: any BlockDriver { child }
}

extension RawNode: ReopenableDriver {
    /// Switches the node between read-only and read-write (QEMU's `bdrv_reopen`); going
    /// read-only flushes first. The cache mode belongs to the file node.
    /// - Throws: ``BlockError`` `.readOnly` when asked to write over a read-only file.
    public func reopen(readOnly: Bool, cache: CacheMode) async throws {
        if readOnly && !isReadOnly { try await flush() }
        if !readOnly && child.isReadOnly { throw BlockError(.readOnly, "Block node is read-only", path: filename, operation: "reopen") }
        setReadOnly(readOnly)
    }
}
