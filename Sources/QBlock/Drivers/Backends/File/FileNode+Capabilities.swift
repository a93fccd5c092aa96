import QBlockCore
import QBlockGraph
/// The capability protocols a file node has (`Graph/Capabilities.swift`): ``HostStorage``
/// (``FileNode/allocatedSize``, ``FileNode/isBlockDevice``, ``FileNode/lock(perm:shared:)``)
/// and reopening.
extension FileNode: HostStorage {}

extension FileNode: ReopenableDriver {
    public func reopen(readOnly: Bool, cache: CacheMode) async throws {
        if readOnly && !isReadOnly { try await flush() }
        let result: Result<Void, Error> = await IOThreadPool.shared.run { Result { try self.reopen(readOnly: readOnly, cache: cache) } }
        try result.get()
    }
}
