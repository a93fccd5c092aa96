import QBlockCore
import QBlockGraph

/// A read-only view of an internal snapshot, as `qemu-img convert -l` and `qemu-nbd -l`
/// load one (QEMU's `bdrv_snapshot_load_tmp`): the image stays open underneath, unchanged.
public enum InternalSnapshotView {
    /// Parses "snapshot.id=ID,snapshot.name=NAME" (either part optional); (nil, nil) for a
    /// plain ID_OR_NAME.
    public static func parse(_ spec: String) -> (id: String?, name: String?) {
        guard spec.hasPrefix("snapshot.") else { return (nil, nil) }
        var id: String?, name: String?
        for part in spec.split(separator: ",") {
            if part.hasPrefix("snapshot.id=") { id = String(part.dropFirst("snapshot.id=".count)) }
            if part.hasPrefix("snapshot.name=") { name = String(part.dropFirst("snapshot.name=".count)) }
        }
        return (id, name)
    }

    /// The snapshot `spec` names in `node` ("ID_OR_NAME" tries ids, then names), read-only.
    /// Closing the view leaves `node` open.
    /// - Throws: ``BlockError`` worded as QEMU's: "Failed to load snapshot: Block format 'raw'
    ///   used by device '' does not support internal snapshots", "Failed to load snapshot:
    ///   Can't find snapshot".
    public static func open(_ spec: String, of node: any BlockDriver) async throws -> any BlockDriver {
        guard let q = node as? any InternalSnapshotting else {
            throw BlockError(.unsupported, "Failed to load snapshot: Block format '\(node.driverName)' used by device '' does not support internal snapshots")
        }
        do {
            let (id, name) = parse(spec)
            return try await (id == nil && name == nil
                ? q.internalSnapshotReader(id: spec, name: nil, orName: spec)
                : q.internalSnapshotReader(id: id, name: name, orName: nil))
        } catch {
            throw BlockError(.notFound, "Failed to load snapshot: \(error.asBlockError.message)")
        }
    }
}
