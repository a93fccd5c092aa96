import QBlockCore
import QBlockGraph
import QBlockOpen

/// QEMU's permission check between the users of one node, for the graph the monitor
/// builds: a node named as another's `file` gets a second parent, an export gets a user, and
/// no two users may conflict — one taking a permission (`write`, `resize`) another does
/// not share. Without it two qcow2 nodes, or a qcow2 node and a writable export of its file,
/// could write one file, each with its own view of the clusters, and corrupt it.
///
/// Each edge takes what QEMU's roles give it: a format that keeps metadata in its file
/// (qcow2) takes its ``FormatDriver/filePermissions(readOnly:)`` (consistent read, and write
/// and resize when writable; sharing neither write nor resize); a pass-through node (raw,
/// filters) takes what its own users take and shares what they all share (nothing taken,
/// everything shared when it has none); an NBD export takes consistent read (and write when
/// writable) and shares all but resize. A new user changes a pass-through node's own edge
/// below it, so the check repeats down the chain.
///
/// Jobs are not users here yet; host files are still protected from other processes by
/// image locks.
enum QMPPermissions {
    typealias Edge = (perm: BlockPermissions, shared: BlockPermissions)

    /// One user of a node: its description in QEMU's words ("node 'q1'", "an unnamed block
    /// device"), the child role it holds ("file", "root") and its edge.
    struct User {
        /// The node or backend (nil: a node being opened, not yet in the graph).
        let id: ObjectIdentifier?
        let name: String
        let role: String
        let edge: Edge
    }

    /// The edge a new node of `driver` opened `readOnly` takes on its data child.
    static func newNodeEdge(driver: String, readOnly: Bool) -> Edge {
        if let format = FormatRegistry.driver(named: driver) {
            let p = format.filePermissions(readOnly: readOnly)
            if !p.shared.contains(.write) { return p }
        }
        return ([], .all)
    }

    /// The edge of an NBD export (QEMU's: the export's permissions, all shared but resize).
    static func exportEdge(writable: Bool) -> Edge {
        (writable ? [.consistentRead, .write] : [.consistentRead], BlockPermissions.all.subtracting(.resize))
    }

    /// Checks that `user` may use `node`, down through pass-through nodes.
    /// - Throws: QEMU's "Permission conflict on node 'N': permissions 'P' are both required
    ///   by A (uses node 'N' as 'R' child) and unshared by B (…)".
    static func check(adding user: User, to node: BlockNode, in block: QMPBlockState) throws {
        var newUser = user
        var node = node
        var seen = Set<ObjectIdentifier>()
        while seen.insert(ObjectIdentifier(node)).inserted {
            // Newest user first, as QEMU keeps its parents; the new or changed one at the head.
            var users = self.users(of: node, in: block).filter { newUser.id == nil || $0.id != newUser.id }
            users.insert(newUser, at: 0)
            for a in users {
                for b in users where b.id != a.id {
                    let missing = b.edge.perm.subtracting(a.edge.shared)
                    guard missing.isEmpty else {
                        let names = BlockPermissions.names.filter { missing.contains($0.0) }.map(\.1).joined(separator: ", ")
                        throw QMPError.generic("Permission conflict on node '\(node.nodeName)': permissions '\(names)' are both required by "
                                               + "\(b.name) (uses node '\(node.nodeName)' as '\(b.role)' child) and unshared by "
                                               + "\(a.name) (uses node '\(node.nodeName)' as '\(a.role)' child).")
                    }
                }
            }
            // A pass-through node now takes what its users take on its own child.
            guard !keepsMetadata(node), let next = node.driver.file as? BlockNode else { return }
            let edge = users.reduce(Edge([], .all)) { ($0.perm.union($1.edge.perm), $0.shared.intersection($1.edge.shared)) }
            newUser = User(id: ObjectIdentifier(node), name: "node '\(node.nodeName)'", role: "file", edge: edge)
            node = next
        }
    }

    /// The users of `node` now, newest first: the nodes whose data child (`file`) it is, and
    /// the exports serving it.
    static func users(of node: BlockNode, in block: QMPBlockState, depth: Int = 0) -> [User] {
        let graph = block.graph
        let parents = graph.nodes.reversed().filter { $0 !== node && ($0.driver.file as AnyObject) === node }.map {
            User(id: ObjectIdentifier($0), name: "node '\($0.nodeName)'", role: "file", edge: edge(of: $0, in: block, depth: depth + 1))
        }
        let roots = graph.backends.reversed().filter { $0.node === node }.compactMap { b -> User? in
            guard let edge = block.rootUserEdge(b) else { return nil }
            return User(id: ObjectIdentifier(b), name: b.name.isEmpty ? "an unnamed block device" : "block device '\(b.name)'",
                        role: "root", edge: edge)
        }
        return parents + roots
    }

    /// Whether `node` is a format keeping metadata in its file (its edge is fixed by its mode).
    static func keepsMetadata(_ node: BlockNode) -> Bool {
        guard let format = FormatRegistry.driver(named: node.driverName) else { return false }
        return !format.filePermissions(readOnly: true).shared.contains(.write)
    }

    /// The edge `node` takes on its data child now.
    static func edge(of node: BlockNode, in block: QMPBlockState, depth: Int = 0) -> Edge {
        if keepsMetadata(node), let format = FormatRegistry.driver(named: node.driverName) {
            return format.filePermissions(readOnly: node.isReadOnly)
        }
        guard depth < 64 else { return ([], .all) }
        return users(of: node, in: block, depth: depth).reduce(Edge([], .all)) {
            ($0.perm.union($1.edge.perm), $0.shared.intersection($1.edge.shared))
        }
    }
}

extension QMPOpenContext {
    /// Checks that the node being opened (a node of ``driver``) may use `child` as its `key`
    /// child (``QMPPermissions``). Backing children are not checked (read-only, shared by design).
    func checkPermissions(attaching child: BlockNode, as key: String, parentName: () -> String) throws {
        guard key != "backing" else { return }
        let edge = QMPPermissions.newNodeEdge(driver: driver, readOnly: readOnly)
        if edge.perm.isEmpty && edge.shared == .all { return }
        try QMPPermissions.check(adding: QMPPermissions.User(id: nil, name: "node '\(parentName())'", role: key, edge: edge),
                                 to: child, in: block)
    }
}
