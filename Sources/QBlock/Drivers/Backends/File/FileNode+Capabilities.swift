import QBlockCore
import QBlockGraph
/// The capability protocols a file node has (`Graph/Capabilities.swift`): ``HostStorage``
/// (``FileNode/allocatedSize``, ``FileNode/isBlockDevice``, ``FileNode/lock(perm:shared:)``)
/// and reopening.
extension FileNode: HostStorage {}

extension FileNode: ReopenableDriver {
    /// Reopens the file read-only or read-write and with another cache mode (QEMU's
    /// `raw_reopen_prepare`/`commit`): a new descriptor replaces the old one, which is retired
    /// once the requests using it finish. Going read-only flushes first.
    /// - Throws: ``BlockError`` from open(2) (`.permissionDenied`, `.unsupported` for `O_DIRECT`),
    ///   or `.closed`.
    public func reopen(readOnly: Bool, cache: CacheMode) async throws {
        if readOnly && !isReadOnly { try await flush() }
        let result: Result<Void, Error> = await IOThreadPool.shared.run { Result { try self.reopen(readOnly: readOnly, cache: cache) } }
        try result.get()
    }
}
