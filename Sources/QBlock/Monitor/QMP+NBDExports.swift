import QBlockBitmaps
import QBlockCore
import QBlockGraph
import QBlockNBDServer
import QBlockNBDWire
/// What `block-export-add` (or `nbd-server-add`) asks for, checked against the graph.
struct NBDExportRequest {
    let id: String
    let node: BlockNode
    let name: String
    let description: String?
    let writable: Bool
    let writethrough: Bool
    let bitmaps: [String]
    let allocationDepth: Bool
}

extension QMPMonitor {
    /// Adds an NBD export serving `request.node` through a new backend in the graph.
    /// Errors are QEMU's, in QEMU's order.
    func addNBDExport(_ request: NBDExportRequest) throws {
        let state = nbd
        guard let server = state.server else { throw QMPError.generic("NBD server not running") }
        if state.export(id: request.id) != nil { throw QMPError.generic("Block export id '\(request.id)' is already in use") }
        // As QEMU, a bitmap is looked for on the node and down its backing chain.
        var exported: [DirtyBitmap] = []
        for name in request.bitmaps {
            var found: DirtyBitmap?
            var cur: (any BlockDriver)? = request.node
            while let c = cur, found == nil {
                if let n = c as? BlockNode { found = BitmapLookup.find(n, name) }
                cur = c.backing
            }
            guard let found else { throw QMPError.generic("Bitmap '\(name)' is not found") }
            exported.append(found)
        }
        if server.exportNames.contains(request.name) {
            throw QMPError.generic("NBD export '\(request.name)' already exists")
        }
        if request.writable && request.node.isReadOnly {
            throw QMPError.generic("Cannot export read-only node as writable")
        }
        let backend = BlockBackend(name: "", node: request.node)
        // QEMU attaches the export's backend sharing everything, then stops sharing resize.
        let edge = QMPPermissions.exportEdge(writable: request.writable)
        for shared in [BlockPermissions.all, edge.shared] {
            try QMPPermissions.check(adding: QMPPermissions.User(id: ObjectIdentifier(backend), name: "an unnamed block device", role: "root",
                                                                 edge: (edge.perm, shared)), to: request.node, in: block)
        }
        block.setRootUserEdge(backend, edge)
        // The node's own discard and detect-zeroes choices govern what clients' TRIM and
        // zero writes do, as in QEMU (the flags live on the node there).
        let info = block.nodeInfo(request.node)
        let discard: NBDExport.DiscardMode = info?.discard == "unmap" ? .unmap : .ignore
        let detect = NBDExport.DetectZeroes(rawValue: info?.detectZeroes ?? "off") ?? .off
        let export = try NBDExport(name: request.name, description: request.description, node: backend,
                                   options: NBDExport.Options(readOnly: !request.writable, discard: discard, detectZeroes: detect,
                                                              allocationDepth: request.allocationDepth,
                                                              writethrough: request.writethrough, multiConnection: true,
                                                              bitmaps: exported))
        graph.attach(backend)
        do {
            try server.addExport(export)
        } catch {
            graph.detach(backend)
            throw error
        }
        state.add(QMPNBDState.Export(id: request.id, export: export, backend: backend))
    }

    /// `block-export-del`: in safe mode an export with clients is refused ("still in use", as
    /// QEMU); in hard mode its clients are disconnected. The export leaves the list at once;
    /// `BLOCK_EXPORT_DELETED` follows when its last client is gone.
    func deleteExport(id: String, hard: Bool) async throws {
        let state = nbd
        guard let e = state.export(id: id) else { throw QMPError.generic("Export '\(id)' is not found") }
        let server = state.server
        var users = 0
        do {
            users = try server?.removeExport(named: e.export.name, force: hard) ?? 0
        } catch let error as BlockError where error.code == .busy {
            throw QMPError.generic("export '\(id)' still in use")
        } catch {
            // Not offered any more (the server was replaced): nothing to refuse.
        }
        _ = state.remove(id: id)
        guard let server, users > 0 else {
            await finishDeletingExport(id: id, backend: e.backend)
            return
        }
        server.disconnectClients(export: e.export.name)
        Task {
            await server.waitForClients(export: e.export.name)
            await self.finishDeletingExport(id: id, backend: e.backend)
        }
    }

    private func finishDeletingExport(id: String, backend: BlockBackend) async {
        graph.detach(backend)
        nbd.forgetRetired(backend)
        emit(event: "BLOCK_EXPORT_DELETED", data: QObject.Dict([("id", .string(id))]))
        await block.collectGarbage()
    }
}
