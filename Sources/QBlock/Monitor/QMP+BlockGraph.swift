import QBlockCore
import QBlockGraph
/// `x-debug-query-block-graph` (QEMU 7.2's `XDbgBlockGraph`): the backends and nodes with
/// numeric ids, and the edges between them with the permissions each parent takes and
/// shares — numbered, listed and ordered as QEMU does (backends first, then nodes in the
/// order they were added, ids given on first sight; both lists newest first, a node's
/// `backing` edge before its `file` edge).
///
/// Permissions are modelled, not tracked (the graph has no permission system):
/// - a format node on its `file`: `consistent-read`, plus `write` and `resize` when the node
///   is writable; it shares `consistent-read` and `write-unchanged`;
/// - a format node on its `backing`: `consistent-read` when the node has a parent, and it
///   shares everything;
/// - raw and filters pass their parents' permissions through (none without parents,
///   sharing everything);
/// - a backend: `consistent-read`, plus `write` on a writable node; an export's backend
///   shares reading and writing, a device's everything.
/// Block jobs are not listed as `block-job` nodes (a job's node references are not
/// recorded in the graph). `graph-mod` is never taken or shared (as in QEMU 7.2's output).
extension QMPMonitor {
    func registerBlockGraphCommands() {
        register("x-debug-query-block-graph") { args, ctx in
            try args.done()
            // Nodes in the order QEMU names them (a node after its file, before its backing chain).
            return ctx.graph.debugGraph(nodeOrder: Array(ctx.monitor.block.nodesInQemuOrder.reversed()))
        }
    }
}

extension BlockGraph {
    /// QEMU's `BlockPermission` order, lowest bit first.
    static let permissionNames = ["consistent-read", "write", "write-unchanged", "resize"]

    /// The `XDbgBlockGraph` of this graph.
    func debugGraph(nodeOrder: [BlockNode]) -> QObject {
        let all = 0b1111, cr = 0b0001, w = 0b0010, wu = 0b0100, resize = 0b1000
        var ids: [ObjectIdentifier: Int] = [:]
        var next = 1
        func id(_ o: AnyObject) -> Int {
            if let i = ids[ObjectIdentifier(o)] { return i }
            ids[ObjectIdentifier(o)] = next
            next += 1
            return next - 1
        }
        struct Edge { var parent: Int, child: Int, name: String, perm: Int, shared: Int }
        var nodeObjects: [QObject] = []
        var edges: [Edge] = []
        // Permissions each node's parents take and share (backends and nodes above it).
        var parentPerm: [ObjectIdentifier: Int] = [:]
        var parentShared: [ObjectIdentifier: Int] = [:]
        func addParent(_ child: AnyObject, perm: Int, shared: Int) {
            parentPerm[ObjectIdentifier(child), default: 0] |= perm
            parentShared[ObjectIdentifier(child), default: all] &= shared
        }
        let backendList = backends
        let nodeList = nodeOrder
        // Parents before children for the pass-through: backends, then overlays before what they use.
        for b in backendList {
            let perm = cr | (b.node.isReadOnly ? 0 : w)
            addParent(b.node, perm: perm, shared: b.name.isEmpty ? cr | w | wu : all)
        }
        func childEdges(_ n: BlockNode) -> [(String, any BlockDriver, Int, Int)] {
            var out: [(String, any BlockDriver, Int, Int)] = []
            let hasParent = parentPerm[ObjectIdentifier(n)] != nil
            let isFormat = n.driver is any ClusteredFormat
            if let b = n.driver.backing {
                out.append(("backing", b, hasParent ? cr : 0, all))
            }
            if let f = n.driver.file {
                if isFormat {
                    out.append(("file", f, cr | (n.isReadOnly ? 0 : w | resize), cr | wu))
                } else {
                    out.append(("file", f, parentPerm[ObjectIdentifier(n)] ?? 0, parentShared[ObjectIdentifier(n)] ?? all))
                }
            }
            return out
        }
        // Propagate from the top: repeat until stable (the graph is small and acyclic).
        for _ in 0..<nodeList.count {
            parentPerm = parentPerm.filter { k, _ in backendList.contains { ObjectIdentifier($0.node) == k } }
            parentShared = parentShared.filter { k, _ in backendList.contains { ObjectIdentifier($0.node) == k } }
            for n in nodeList.reversed() {
                for (_, child, perm, shared) in childEdges(n) { addParent(child as AnyObject, perm: perm, shared: shared) }
            }
        }
        for b in backendList {
            let bid = id(b)
            nodeObjects.append(.dict(QObject.Dict([("name", .string(b.name)), ("type", .string("block-backend")), ("id", .int(Int64(bid)))])))
            edges.append(Edge(parent: bid, child: id(b.node), name: "root", perm: cr | (b.node.isReadOnly ? 0 : w),
                              shared: b.name.isEmpty ? cr | w | wu : all))
        }
        var listed = Set<ObjectIdentifier>()
        var unlisted: [AnyObject] = []
        for n in nodeList {
            let nid = id(n)
            listed.insert(ObjectIdentifier(n))
            nodeObjects.append(.dict(QObject.Dict([("name", .string(n.nodeName)), ("type", .string("block-driver")), ("id", .int(Int64(nid)))])))
            for (name, child, perm, shared) in childEdges(n) {
                edges.append(Edge(parent: nid, child: id(child as AnyObject), name: name, perm: perm, shared: shared))
                if !(child is BlockNode) { unlisted.append(child as AnyObject) }
            }
        }
        // Children that are not nodes of the graph (opened inside a driver): unnamed nodes.
        for c in unlisted where listed.insert(ObjectIdentifier(c)).inserted {
            nodeObjects.append(.dict(QObject.Dict([("name", .string("")), ("type", .string("block-driver")), ("id", .int(Int64(id(c))))])))
        }
        func names(_ bits: Int) -> QObject {
            .list(Self.permissionNames.indices.reversed().filter { bits & (1 << $0) != 0 }.map { .string(Self.permissionNames[$0]) })
        }
        let edgeObjects: [QObject] = edges.reversed().map { e in
            .dict(QObject.Dict([("parent", .int(Int64(e.parent))), ("child", .int(Int64(e.child))), ("name", .string(e.name)),
                                ("perm", names(e.perm)), ("shared-perm", names(e.shared))]))
        }
        return .dict(QObject.Dict([("nodes", .list(nodeObjects.reversed())), ("edges", .list(edgeObjects))]))
    }
}
