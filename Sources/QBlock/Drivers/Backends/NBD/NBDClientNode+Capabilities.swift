import QBlockGraph
/// The capability protocols an NBD client node has (`Graph/Capabilities.swift`).
extension NBDClientNode: NetworkStorage {
    public var exportName: String { uri.exportName }
}
