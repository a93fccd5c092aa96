/// The NBD server of a monitor (`nbd-server-start`) and its exports (`block-export-add`).
/// Each export serves a ``BlockBackend`` attached to the graph, so that a live snapshot or a
/// mirror pivot switches what the export's clients read and write.
public final class QMPNBDState: @unchecked Sendable {
    /// One `block-export-add` export: its id, the NBD export and the backend it serves.
    public struct Export {
        public let id: String
        public let export: NBDExport
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
            _ = try args.optionalString("tls-creds")
            _ = try args.optionalString("tls-authz")
            let maxConnections = try args.optionalUInt("max-connections", bits: 32) ?? 0
            try args.done()
            let state = ctx.monitor.nbd
            if state.server != nil { throw QMPError.generic("NBD server already running") }
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
            let state = ctx.monitor.nbd
            guard let server = state.server else { throw QMPError.generic("NBD server not running") }
            if state.export(id: id) != nil { throw QMPError.generic("Block export id '\(id)' is already in use") }
            guard let node = ctx.graph.node(named: nodeName) else { throw QMPError.noDevice(node: nodeName) }
            // As QEMU, a bitmap is looked for on the node and down its backing chain.
            var exported: [DirtyBitmap] = []
            for name in bitmaps {
                var found: DirtyBitmap?
                var cur: (any BlockDriver)? = node
                while let c = cur, found == nil {
                    if let n = c as? BlockNode { found = BitmapLookup.find(n, name) }
                    cur = c.backing
                }
                guard let found else { throw QMPError.generic("Bitmap '\(name)' is not found") }
                exported.append(found)
            }
            let exportName = name ?? nodeName
            if server.exportNames.contains(exportName) {
                throw QMPError.generic("NBD export '\(exportName)' already exists")
            }
            if writable && node.isReadOnly {
                throw QMPError.generic("Could not open node '\(nodeName)' read-write: node is read-only")
            }
            let backend = BlockBackend(name: "", node: node)
            let export = try NBDExport(name: exportName, description: description, node: backend,
                                       options: NBDExport.Options(readOnly: !writable, allocationDepth: allocationDepth,
                                                                  writethrough: writethrough, multiConnection: true,
                                                                  bitmaps: exported))
            ctx.graph.attach(backend)
            do {
                try server.addExport(export)
            } catch {
                ctx.graph.detach(backend)
                throw error
            }
            state.add(QMPNBDState.Export(id: id, export: export, backend: backend))
            return .dict(QObject.Dict())
        }
        register("block-export-del") { args, ctx in
            let id = try args.string("id")
            _ = try args.optionalEnum("mode", ["safe", "hard"])
            try args.done()
            let state = ctx.monitor.nbd
            guard let e = state.export(id: id) else { throw QMPError.generic("Export '\(id)' is not found") }
            try? state.server?.removeExport(named: e.export.name)
            _ = state.remove(id: id)
            if state.server?.clientCount ?? 0 == 0 {
                ctx.graph.detach(e.backend)
                await ctx.monitor.block.collectGarbage()
            }
            ctx.emit(event: "BLOCK_EXPORT_DELETED", data: QObject.Dict([("id", .string(id))]))
            return .dict(QObject.Dict())
        }
        register("query-block-exports", exclusive: false) { args, ctx in
            try args.done()
            return .list(ctx.monitor.nbd.all.map { e in
                .dict(QObject.Dict([("type", .string("nbd")), ("id", .string(e.id)),
                                    ("node-name", .string(e.backend.node.nodeName)), ("shutting-down", .bool(false))]))
            })
        }
    }
}
