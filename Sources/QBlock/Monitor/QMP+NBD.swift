import QBlockCore
import QBlockGraph
import QBlockNBDServer
import QBlockNBDWire
/// The NBD server of a monitor (`nbd-server-start`) and its exports (`block-export-add`).
/// Each export serves a ``BlockBackend`` attached to the graph, so that a live snapshot or a
/// mirror pivot switches what the export's clients read and write.
// @unchecked: `_server`, `exports` and `retired` are only touched with `lock` held.
public final class QMPNBDState: @unchecked Sendable {
    /// One `block-export-add` export: its id, the NBD export and the backend it serves.
    public struct Export {
        /// The export's id (`id` of `block-export-add`), used by `block-export-del`.
        public let id: String
        /// The NBD export the server offers.
        public let export: NBDExport
        /// The backend the export serves, attached to the monitor's graph.
        public let backend: BlockBackend
    }

    private let lock = PosixMutex()
    /// The running server, if any.
    public internal(set) var server: NBDServer? {
        get { lock.withLock { _server } }
        set { lock.withLock { _server = newValue } }
    }
    private var _server: NBDServer?
    private var exports: [Export] = []
    /// Backends of deleted exports that clients may still be using (detached when the server stops).
    private var retired: [BlockBackend] = []

    /// The exports, in the order added.
    public var all: [Export] { lock.withLock { exports } }

    /// The export with id `id`.
    public func export(id: String) -> Export? { lock.withLock { exports.first { $0.id == id } } }

    func add(_ e: Export) { lock.withLock { exports.append(e) } }

    func remove(id: String) -> Export? {
        lock.withLock {
            guard let i = exports.firstIndex(where: { $0.id == id }) else { return nil }
            let e = exports.remove(at: i)
            retired.append(e.backend)
            return e
        }
    }

    /// A deleted export's backend, once its last client has gone.
    func forgetRetired(_ backend: BlockBackend) { lock.withLock { retired.removeAll { $0 === backend } } }

    /// Stops the server, ends every export and detaches their backends.
    func stop(graph: BlockGraph) async -> [String] {
        let (s, ids, backends): (NBDServer?, [String], [BlockBackend]) = lock.withLock {
            let r = (_server, exports.map(\.id), exports.map(\.backend) + retired)
            _server = nil
            exports = []
            retired = []
            return r
        }
        await s?.shutdown()
        for b in backends { graph.detach(b) }
        return ids
    }
}

extension QMPMonitor {
    /// The NBD server state of this monitor.
    public var nbd: QMPNBDState { state(QMPNBDState.self) { QMPNBDState() } }

    /// Stops the NBD server (if running) and ends its exports, emitting `BLOCK_EXPORT_DELETED`.
    public func stopNBDServer() async {
        for id in await nbd.stop(graph: graph) {
            emit(event: "BLOCK_EXPORT_DELETED", data: QObject.Dict([("id", .string(id))]))
        }
        await block.collectGarbage()
    }

    func registerNBDCommands() {
        register("nbd-server-start") { args, ctx in
            let addr = try QMPSocketAddress.parse(try args.object("addr"), legacy: true)
            let tlsCreds = try args.optionalString("tls-creds")
            // (tls-authz only applies to TLS sessions, as in QEMU.)
            _ = try args.optionalString("tls-authz")
            let maxConnections = try args.optionalUInt("max-connections", bits: 32) ?? 0
            try args.done()
            let state = ctx.monitor.nbd
            if state.server != nil { throw QMPError.generic("NBD server already running") }
            if let tlsCreds {
                // No TLS credentials object can be created here (object-add refuses the
                // tls-creds-* types), so a server asked for TLS never starts in plain text.
                throw QMPError.generic(ctx.monitor.objects.exists(tlsCreds) ? "Object with id '\(tlsCreds)' is not TLS credentials"
                                       : "No TLS credentials with id '\(tlsCreds)'")
            }
            let server = NBDServer(options: NBDServer.Options(maxClients: maxConnections == 0 ? 1 << 16 : Int(maxConnections),
                                                              persistent: true))
            switch addr {
            case .unix(let path): try server.listen(unix: path)
            case .tcp(let host, let port): try server.listen(host: host, port: port)
            }
            try server.start()
            state.server = server
            return .dict(QObject.Dict())
        }
        register("nbd-server-stop") { args, ctx in
            try args.done()
            if ctx.monitor.nbd.server == nil { throw QMPError.generic("NBD server not running") }
            await ctx.monitor.stopNBDServer()
            return .dict(QObject.Dict())
        }
        register("block-export-add") { args, ctx in
            let type = try args.enumValue("type", ["nbd", "vhost-user-blk", "fuse", "vduse-blk"])
            let id = try args.string("id")
            let nodeName = try args.string("node-name")
            let writable = try args.optionalBool("writable") ?? false
            let writethrough = try args.optionalBool("writethrough") ?? false
            _ = try args.optionalString("iothread")
            _ = try args.optionalBool("fixed-iothread")
            let name = try args.optionalString("name")
            let description = try args.optionalString("description")
            let bitmaps = try args.optionalStringList("bitmaps") ?? []
            let allocationDepth = try args.optionalBool("allocation-depth") ?? false
            try args.done()
            guard type == "nbd" else { throw QMPError.generic("Export type '\(type)' is not supported") }
            guard let node = ctx.graph.node(named: nodeName) else { throw QMPError.noDevice(node: nodeName) }
            try ctx.monitor.addNBDExport(NBDExportRequest(id: id, node: node, name: name ?? nodeName, description: description,
                                                          writable: writable, writethrough: writethrough,
                                                          bitmaps: bitmaps, allocationDepth: allocationDepth))
            return .dict(QObject.Dict())
        }
        register("block-export-del") { args, ctx in
            let id = try args.string("id")
            let mode = try args.optionalEnum("mode", ["safe", "hard"]) ?? "safe"
            try args.done()
            try await ctx.monitor.deleteExport(id: id, hard: mode == "hard")
            return .dict(QObject.Dict())
        }
        // The older pair, still used by scripts: the export's id is its name.
        register("nbd-server-add") { args, ctx in
            let device = try args.string("device")
            let name = try args.optionalString("name")
            let description = try args.optionalString("description")
            var writable = try args.optionalBool("writable") ?? false
            let bitmap = try args.optionalString("bitmap")
            try args.done()
            if ctx.monitor.nbd.server == nil { throw QMPError.generic("NBD server not running") }
            // `device` is a device's backend first, then a node (QEMU's bdrv_lookup_bs).
            let byDevice = ctx.graph.backends.first { !$0.name.isEmpty && $0.name == device }?.node
            guard let node = byDevice ?? ctx.graph.node(named: device) else {
                throw QMPError.noDevice(device: device, node: device)
            }
            // Unlike block-export-add, a read-only node is quietly exported read-only.
            if node.isReadOnly { writable = false }
            try ctx.monitor.addNBDExport(NBDExportRequest(id: name ?? device, node: node, name: name ?? device,
                                                          description: description, writable: writable, writethrough: false,
                                                          bitmaps: bitmap.map { [$0] } ?? [], allocationDepth: false))
            return .dict(QObject.Dict())
        }
        register("nbd-server-remove") { args, ctx in
            let name = try args.string("name")
            let mode = try args.optionalEnum("mode", ["safe", "hard"]) ?? "safe"
            try args.done()
            if ctx.monitor.nbd.server == nil { throw QMPError.generic("NBD server not running") }
            try await ctx.monitor.deleteExport(id: name, hard: mode == "hard")
            return .dict(QObject.Dict())
        }
        register("query-block-exports", exclusive: false) { args, ctx in
            try args.done()
            return .list(ctx.monitor.nbd.all.reversed().map { e in   // newest first, as QEMU lists them
                .dict(QObject.Dict([("type", .string("nbd")), ("id", .string(e.id)),
                                    ("node-name", .string(e.backend.node.nodeName)), ("shutting-down", .bool(false))]))
            })
        }
    }
}
