import QBlockCore
import QBlockGraph
/// Internal snapshots of a live node (``InternalSnapshotting``): `blockdev-snapshot-internal-sync` (device, name)
/// and `blockdev-snapshot-delete-internal-sync` (device, id and/or name; returns QEMU's
/// `SnapshotInfo` of the deleted snapshot). Both work on a root node (a device or a node no
/// other node uses), with every writer held while the snapshot table changes.
///
/// QBlock has no virtual machine clock in the daemon: `vm-clock-*` is what the image stores
/// (0 for snapshots taken here, as `qemu-img snapshot -c` stores).
extension QMPMonitor {
    func registerInternalSnapshotCommands() {
        register("blockdev-snapshot-internal-sync") { args, ctx in
            let device = try args.string("device")
            let name = try args.string("name")
            try args.done()
            let (node, q) = try QMPInternalSnapshot.target(ctx, device)
            if node.isReadOnly || ctx.monitor.block.isReportedReadOnly(node) {
                throw QMPError.generic("Device '\(device)' is read only")
            }
            if name.isEmpty { throw QMPError.generic("Name is empty") }
            if q.findInternalSnapshot(id: nil, name: name) != nil {
                throw QMPError.generic("Snapshot with name '\(name)' already exists on device '\(device)'")
            }
            try await ctx.graph.drained {
                // No icount (QEMU stores -1 without record/replay).
                _ = try await q.createInternalSnapshot(name: name, icount: nil)
            }
            return .dict(QObject.Dict())
        }
        register("blockdev-snapshot-delete-internal-sync") { args, ctx in
            let device = try args.string("device")
            let id = try args.optionalString("id")
            let name = try args.optionalString("name")
            try args.done()
            let node = try QMPBlockLookup.rootNode(ctx.graph, device)
            if id == nil && name == nil { throw QMPError.generic("Name or id must be provided") }
            guard let q = node.innermostDriver as? any InternalSnapshotting else {
                throw QMPError.generic("Failed to get a snapshot list: Operation not supported")
            }
            guard let sn = q.findInternalSnapshot(id: id, name: name) else {
                throw QMPError.generic("Snapshot with id '\(id ?? "null")' and name '\(name ?? "null")' does not exist on device '\(device)'")
            }
            try await ctx.graph.drained {
                try await q.deleteSnapshot(idOrName: sn.id)
            }
            return QMPInternalSnapshot.info(sn)
        }
    }
}

enum QMPInternalSnapshot {
    /// The root node `device` names and its format driver, with QEMU's errors.
    static func target(_ ctx: QMPContext, _ device: String) throws -> (BlockNode, any InternalSnapshotting) {
        let node = try QMPBlockLookup.rootNode(ctx.graph, device)
        guard let q = node.innermostDriver as? any InternalSnapshotting else {
            throw QMPError.generic("Block format '\(node.driverName)' used by device '\(device)' does not support internal snapshots")
        }
        return (node, q)
    }

    /// QEMU's `SnapshotInfo`.
    static func info(_ sn: SnapshotInfo) -> QObject {
        var d = QObject.Dict()
        d["id"] = .string(sn.id)
        d["name"] = .string(sn.name)
        d["vm-state-size"] = .int(Int64(sn.vmStateSize))
        d["date-sec"] = .int(Int64(sn.dateSeconds))
        d["date-nsec"] = .int(Int64(sn.dateNanoseconds))
        d["vm-clock-sec"] = .int(Int64(sn.vmClockNanoseconds / 1_000_000_000))
        d["vm-clock-nsec"] = .int(Int64(sn.vmClockNanoseconds % 1_000_000_000))
        if let ic = sn.icount { d["icount"] = .int(Int64(bitPattern: ic)) }
        return .dict(d)
    }
}
