import QBlockGraph
/// The capability protocols an NBD client node has (`Graph/Capabilities.swift`).
extension NBDClientNode: NetworkStorage {
    /// The name of the export this node is connected to.
    public var exportName: String { uri.exportName }
}
