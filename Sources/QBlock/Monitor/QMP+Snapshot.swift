#if canImport(Glibc)
import Glibc
#endif
import QBlockCore
import QBlockDrivers
import QBlockGraph
import QBlockOperations
import QBlockOpen
import QBlockAPI

/// Live external snapshots: `blockdev-snapshot-sync` (create or open an overlay file) and
/// `blockdev-snapshot` (an overlay node already added). Both put the overlay above the
/// node, with the node as its backing, and switch every user of the node to the overlay.
///
/// The overlay is created and opened before writers are held; while they are held (the
/// graph's drained section) only the node is flushed, the backing link set and the users
/// switched, so the pause a writer sees is a flush and two pointer updates. The steps are
/// the library's ``ExternalSnapshot`` recipe (the one ``LiveDisk/snapshot(to:)`` runs); the
/// monitor reports the old node read-only (QMPBlockState.markReadOnly) rather than reopening it.
extension QMPMonitor {
    func registerSnapshotCommands() {
        register("blockdev-snapshot-sync") { args, ctx in
            let action = try SnapshotSyncAction(args, monitor: ctx.monitor)
            try await QMPTransaction.run([action], graph: ctx.graph)
            return .dict(QObject.Dict())
        }
        register("blockdev-snapshot") { args, ctx in
            let action = try SnapshotAction(args, monitor: ctx.monitor)
            try await QMPTransaction.run([action], graph: ctx.graph)
            return .dict(QObject.Dict())
        }
    }
}

/// Shared by both snapshot actions: the recipe's drained steps and what follows them
/// (``QMPTransactionAction/prepareDrained()``, ``QMPTransactionAction/commitDrained()``,
/// ``QMPTransactionAction/commit()``); each action adds its own preparation and abort.
class SnapshotBase {
    let monitor: QMPMonitor
    /// Set once prepared: what to switch.
    var snapshot: ExternalSnapshot?

    init(monitor: QMPMonitor) { self.monitor = monitor }

    /// The recipe for putting `overlay` above `old`, its checks' errors in QMP's words.
    func recipe(old: BlockNode, overlay: BlockNode) throws -> ExternalSnapshot {
        do { return try ExternalSnapshot(old: old, overlay: overlay, graph: monitor.graph) } catch {
            throw QMPError.generic(error.message)
        }
    }

    /// Flushes the node while writers are held, so that its content is stable before it
    /// becomes a backing image.
    func prepareDrained() async throws {
        try await snapshot?.prepareDrained()
    }

    /// Links the overlay above the node and switches the node's users to it; the node is
    /// reported read-only from now on.
    func commitDrained() {
        guard let snapshot else { return }
        snapshot.commitDrained(in: monitor.graph)
        monitor.block.markReadOnly(snapshot.old)
    }

    /// Nothing once writers run again: the monitor reports the old node read-only
    /// (``commitDrained()``) instead of reopening it, as ``LiveDisk`` does.
    func commit() async {}
}

/// `blockdev-snapshot-sync`: device or node-name, snapshot-file, snapshot-node-name, format,
/// mode (absolute-paths creates the overlay with the node's file as backing file, as
/// `qemu-img create -b` does; existing opens the file as it is).
final class SnapshotSyncAction: SnapshotBase, QMPTransactionAction {
    let device: String?
    let nodeName: String?
    let file: String
    let overlayName: String?
    let format: String
    let mode: String
    private var created = false
    private var overlay: BlockNode?

    init(_ args: QMPArguments, monitor: QMPMonitor) throws {
        device = try args.optionalString("device")
        nodeName = try args.optionalString("node-name")
        file = try args.string("snapshot-file")
        overlayName = try args.optionalString("snapshot-node-name")
        format = try args.optionalString("format") ?? "qcow2"
        mode = try args.optionalEnum("mode", ["existing", "absolute-paths"]) ?? "absolute-paths"
        try args.done()
        super.init(monitor: monitor)
    }

    func prepare() async throws {
        let graph = monitor.graph
        // `device` names a device's backend (a `vm` drive id) first, as QEMU's bdrv_lookup_bs.
        let byDevice = device.flatMap { d in graph.backends.first { !$0.name.isEmpty && $0.name == d }?.node }
        let found = byDevice ?? [device, nodeName].compactMap { $0 }.lazy.compactMap { graph.node(named: $0) }.first
        guard let node = found else { throw QMPError.noDevice(device: device ?? "", node: nodeName ?? "") }
        if let overlayName {
            if graph.node(named: overlayName) != nil { throw QMPError.generic("New overlay node-name already in use") }
            try QMPBlockState.checkNodeName(overlayName)
        }
        guard let driver = FormatRegistry.driver(named: format), driver.supportsBackingFile else {
            throw QMPError.generic(mode == "existing" ? "The overlay does not support backing images"
                                   : "Backing file not supported for file format '\(format)'")
        }
        let t0 = Trace.now()
        defer { Trace.log("snapshot prepare: \(Trace.now() - t0) us") }
        if mode == "absolute-paths" {
            if access(file, F_OK) == 0 { unlink(file) }
            do {
                try await ExternalSnapshot.createOverlayFile(at: file, above: node)
            } catch let e as BlockError {
                throw QMPError.generic(e.message)
            }
            created = true
        }
        let block = monitor.block
        do {
            // The overlay's protocol (a host file) from its name.
            var d = QObject.Dict([("driver", .string(format)), ("backing", .null),
                                  ("file", .dict(try ProtocolRegistry.blockdevOptions(forFilename: file)))])
            if let overlayName { d["node-name"] = .string(overlayName) }
            let o = try await block.open(QMPArguments(d), parent: nil, isRoot: false)
            block.setAutoDelete(o)
            block.inheritOptions(o, from: node)
            overlay = o
            Trace.log("  created and opened: \(Trace.now() - t0) us")
            let recipe = try recipe(old: node, overlay: o)
            try await recipe.preflush()
            snapshot = recipe
        } catch {
            if let o = overlay { try? await monitor.block.delete(o) }
            overlay = nil
            if created { unlink(file) }
            throw error
        }
    }

    func abort() async {
        if let overlay { try? await monitor.block.delete(overlay) }
        overlay = nil
        snapshot = nil
        if created { unlink(file) }
    }
}

/// `blockdev-snapshot`: node, overlay (a node added with `blockdev-add`, without backing).
final class SnapshotAction: SnapshotBase, QMPTransactionAction {
    let nodeName: String
    let overlayName: String

    init(_ args: QMPArguments, monitor: QMPMonitor) throws {
        nodeName = try args.string("node")
        overlayName = try args.string("overlay")
        try args.done()
        super.init(monitor: monitor)
    }

    func prepare() async throws {
        let graph = monitor.graph
        guard let node = graph.node(named: nodeName) else { throw QMPError.noDevice(device: nodeName, node: nodeName) }
        guard let o = graph.node(named: overlayName) else { throw QMPError.noDevice(device: overlayName, node: overlayName) }
        let recipe = try recipe(old: node, overlay: o)
        try await recipe.preflush()
        snapshot = recipe
    }

    /// Nothing to undo: the overlay is the user's node (`blockdev-add`) and stays as it was.
    func abort() async {}
}
