import QBlockCore
import QBlockDrivers
import QBlockGraph
import QBlockOperations
/// Devices and nodes at run time (QEMU 7.2's `qapi/block.json` / `block-core.json`):
/// `query-block`, `query-blockstats`, `block_resize`, `block-set-write-threshold` (event
/// `BLOCK_WRITE_THRESHOLD`), `change-backing-file`.
///
/// A *device* here is a named ``BlockBackend`` (a `vm` drive, named by its drive id);
/// `nbd --qmp` has none, as qemu-storage-daemon has none (its exports' backends are
/// anonymous), so there `query-block` is `[]`.
extension QMPMonitor {
    func registerBlockQueryCommands() {
        register("query-block") { args, ctx in
            try args.done()
            let block = ctx.monitor.block
            return .list(ctx.graph.backends.filter { !$0.name.isEmpty }.map { block.blockInfo($0) })
        }
        register("query-blockstats") { args, ctx in
            let queryNodes = try args.bool("query-nodes", default: false)
            try args.done()
            let block = ctx.monitor.block
            if queryNodes {
                // QEMU walks its node list oldest first (query-named-block-nodes is newest first).
                return .list(block.nodesInQemuOrder.reversed().map { block.nodeStats($0, backendLevel: false) })
            }
            return .list(ctx.graph.backends.filter { !$0.name.isEmpty }.map { block.backendStats($0) })
        }
        register("block_resize") { args, ctx in
            let device = try args.optionalString("device")
            let nodeName = try args.optionalString("node-name")
            let size = try args.int("size")
            try args.done()
            let node = try QMPBlockLookup.node(ctx.graph, device: device, nodeName: nodeName)
            if size < 0 { throw QMPError.generic("Parameter 'size' expects a >0 size") }
            if let (parent, role) = QMPBlockLookup.parent(of: node, in: ctx.graph), role == "file",
               !(parent.innermostDriver is any PassThroughFormat) {
                // A format node does not share resizing its file (raw, a pass-through, does).
                throw QMPError.generic("Permission conflict on node '\(node.nodeName)': permissions 'resize' are both required by an unnamed block device (uses node '\(node.nodeName)' as 'root' child) and unshared by node '\(parent.nodeName)' (uses node '\(node.nodeName)' as '\(role)' child).")
            }
            if ctx.graph.backends(of: node).contains(where: { $0.name.isEmpty }) {
                // An export's (or a job's) backend does not share resizing; a device's does.
                throw QMPError.generic("Permission conflict on node '\(node.nodeName)': permissions 'resize' are both required by an unnamed block device (uses node '\(node.nodeName)' as 'root' child) and unshared by an unnamed block device (uses node '\(node.nodeName)' as 'root' child).")
            }
            if node.isReadOnly || ctx.monitor.block.isReportedReadOnly(node) { throw QMPError.generic("Block node is read-only") }
            try await ctx.graph.drained {
                try await node.truncate(to: size, preallocation: .off)
            }
            return .dict(QObject.Dict())
        }
        register("block-set-write-threshold") { args, ctx in
            let name = try args.string("node-name")
            // QAPI uint64, whose input visitor takes a negative number as its two's complement.
            guard let v = args.value("write-threshold") else { throw args.missing("write-threshold") }
            guard case .int(let value) = v else { throw QMPError.generic("Parameter 'write-threshold' expects uint64") }
            try args.done()
            guard let node = ctx.graph.node(named: name) else { throw QMPError.generic("Device '\(name)' not found") }
            let monitor = ctx.monitor
            let nodeName = node.nodeName
            node.watch.setWriteThreshold(UInt64(bitPattern: value)) { [weak monitor] exceeded, threshold in
                monitor?.emit(event: "BLOCK_WRITE_THRESHOLD", data: QObject.Dict([
                    ("node-name", .string(nodeName)),
                    ("amount-exceeded", .int(Int64(bitPattern: exceeded))),
                    ("write-threshold", .int(Int64(bitPattern: threshold))),
                ]))
            }
            return .dict(QObject.Dict())
        }
        register("change-backing-file") { args, ctx in
            let device = try args.string("device")
            let imageName = try args.string("image-node-name")
            let backingFile = try args.string("backing-file")
            try args.done()
            let graph = ctx.graph
            let root = try QMPBlockLookup.rootNode(graph, device)
            guard let image = graph.node(named: imageName) else { throw QMPError.noDevice(device: "", node: imageName) }
            guard image.backing != nil else {
                throw QMPError.generic("not allowing backing file change on an image without a backing file")
            }
            guard root.backingChain.contains(where: { $0 === image }) else {
                throw QMPError.generic("'\(device)' and image file are not in the same chain")
            }
            let format = image.backing.map { $0.innermostDriver.driverName } ?? ""
            do {
                try await ImageRebase.changeBackingFile(of: image.innermostDriver, to: backingFile, format: format)
            } catch let e as BlockError {
                let reason = e.errno.map { BlockError.strerror($0) } ?? e.message
                throw QMPError.generic("Could not change backing file to '\(backingFile)': \(reason)")
            }
            return .dict(QObject.Dict())
        }
    }
}

/// QEMU's node lookups (`bdrv_lookup_bs`, `qmp_get_root_bs`) over our graph.
enum QMPBlockLookup {
    /// A device (named backend) first, then a node name: "Cannot find device=… nor node-name=…".
    static func node(_ graph: BlockGraph, device: String?, nodeName: String?) throws -> BlockNode {
        if let device, let b = graph.backends.first(where: { !$0.name.isEmpty && $0.name == device }) { return b.node }
        if let nodeName, let n = graph.node(named: nodeName) { return n }
        throw QMPError.noDevice(device: device ?? "", node: nodeName ?? "")
    }

    /// The node that uses `node` as its file or backing child, and the child's role.
    static func parent(of node: BlockNode, in graph: BlockGraph) -> (BlockNode, String)? {
        for other in graph.nodes where other !== node {
            if let f = other.driver.file, f as AnyObject === node { return (other, "file") }
            if let b = other.driver.backing, b as AnyObject === node { return (other, "backing") }
        }
        return nil
    }

    /// A device or node name that must name a root node ("Need a root block node").
    static func rootNode(_ graph: BlockGraph, _ name: String) throws -> BlockNode {
        let node = try self.node(graph, device: name, nodeName: name)
        if parent(of: node, in: graph) != nil { throw QMPError.generic("Need a root block node") }
        return node
    }
}

extension QMPBlockState {
    /// QEMU's `BlockInfo` for a named backend (a device's drive).
    func blockInfo(_ backend: BlockBackend) -> QObject {
        var d = QObject.Dict()
        d["device"] = .string(backend.name)
        if let q = backend.qdev { d["qdev"] = .string(q) }
        d["type"] = .string("unknown")
        d["removable"] = .bool(false)
        d["locked"] = .bool(false)
        // A device with an I/O status (virtio-blk has one): we never stop on errors, so "ok".
        if backend.qdev != nil { d["io-status"] = .string("ok") }
        d["inserted"] = deviceInfo(backend.node, flat: false)
        return .dict(d)
    }

    /// QEMU's `BlockDeviceStats` with every counter 0 but `wr_highest_offset`.
    private static func zeroStats(highest: Int64) -> QObject.Dict {
        var s = QObject.Dict()
        for k in ["rd_bytes", "wr_bytes", "unmap_bytes", "rd_operations", "wr_operations", "unmap_operations",
                  "rd_total_time_ns", "wr_total_time_ns", "flush_total_time_ns", "unmap_total_time_ns", "flush_operations",
                  "wr_highest_offset", "rd_merged", "wr_merged", "unmap_merged",
                  "failed_rd_operations", "failed_wr_operations", "failed_flush_operations", "failed_unmap_operations",
                  "invalid_rd_operations", "invalid_wr_operations", "invalid_flush_operations", "invalid_unmap_operations"] {
            s[k] = .int(0)
        }
        s["wr_highest_offset"] = .int(highest)
        s["account_invalid"] = .bool(false)
        s["account_failed"] = .bool(false)
        s["timed_stats"] = .list([])
        return s
    }

    /// QEMU's `BlockStats` of a node: node-level counters are only the highest offset
    /// written (and a file node's discards), as in QEMU, where the rest is per backend.
    func nodeStats(_ node: BlockNode, backendLevel: Bool) -> QObject {
        var d = QObject.Dict()
        d["node-name"] = .string(node.nodeName)
        d["stats"] = .dict(Self.zeroStats(highest: node.watch.highestOffset))
        if node.innermostDriver is any HostStorage {
            // (QEMU's `BlockStatsSpecificFile`, discriminated by the node's driver: `file`.)
            let dc = node.watch.discards
            d["driver-specific"] = .dict(QObject.Dict([("driver", .string(node.innermostDriver.driverName)), ("discard-nb-ok", .int(dc.ok)),
                                                        ("discard-nb-failed", .int(dc.failed)), ("discard-bytes-ok", .int(dc.bytes))]))
        }
        if let f = node.driver.file as? BlockNode { d["parent"] = nodeStats(f, backendLevel: backendLevel) }
        if backendLevel, let b = node.driver.backing as? BlockNode { d["backing"] = nodeStats(b, backendLevel: true) }
        return .dict(d)
    }

    /// QEMU's `BlockStats` of a device: its backend's request accounting over its node's.
    func backendStats(_ backend: BlockBackend) -> QObject {
        guard case .dict(var d) = nodeStats(backend.node, backendLevel: true), case .dict(var s)? = d["stats"] else {
            return .dict(QObject.Dict())
        }
        let st = backend.stats
        d["device"] = .string(backend.name)
        if let q = backend.qdev { d["qdev"] = .string(q) }
        for (prefix, k) in [("rd", st.read), ("wr", st.write), ("unmap", st.unmap)] {
            s["\(prefix)_bytes"] = .int(k.bytes)
            s["\(prefix)_operations"] = .int(k.operations)
            s["\(prefix)_total_time_ns"] = .int(k.totalTimeNs)
            s["failed_\(prefix)_operations"] = .int(k.failed)
        }
        s["flush_operations"] = .int(st.flush.operations)
        s["flush_total_time_ns"] = .int(st.flush.totalTimeNs)
        s["failed_flush_operations"] = .int(st.flush.failed)
        s["account_invalid"] = .bool(true)
        s["account_failed"] = .bool(true)
        if st.lastAccessNs != 0 {
            s["idle_time_ns"] = .int(Int64(clamping: BlockBackendStats.now() &- st.lastAccessNs))
        }
        d["stats"] = .dict(s)
        return .dict(d)
    }
}
