import QBlockCore
import QBlockGraph
/// The capability protocols a raw node has (`Graph/Capabilities.swift`).
extension RawNode: PassThroughFormat {
    public var passedThrough: any BlockDriver { child }
}

extension RawNode: ReopenableDriver {
    public func reopen(readOnly: Bool, cache: CacheMode) async throws {
        if readOnly && !isReadOnly { try await flush() }
        if !readOnly && child.isReadOnly { throw BlockError(.readOnly, "Block node is read-only", path: filename, operation: "reopen") }
        setReadOnly(readOnly)
    }
}
