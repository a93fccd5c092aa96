import QBlockCore
/// The nodes a process has open and the users attached to them: the registry behind
/// QMP's `blockdev-add`, `query-named-block-nodes`, exports, devices and jobs, and the one
/// place where users are switched from one node to another.
///
/// Switching happens inside ``drained(_:)``: every backend holds new requests and waits
/// for its requests in flight, the body changes the graph (opens an overlay, replaces a
/// node), and the held requests then continue on the new nodes. No request is lost or
/// split across the switch, and the pause lasts as long as the body.
// @unchecked: `nodeList`, `backendList` and `nameCounter` are only touched with `lock` held; graph
// changes are also serialized by the AsyncMutex `changes`.
public final class BlockGraph: @unchecked Sendable {
    private let lock = PosixMutex()
    private var nodeList: [BlockNode] = []
    private var backendList: [BlockBackend] = []
    private var nameCounter = 0
    /// Serializes graph changes (drained sections) so that two operations never switch
    /// nodes under one another.
    private let changes = AsyncMutex()

    /// Creates an empty graph.
    public init() {}

    /// Every node, in the order added.
    public var nodes: [BlockNode] { lock.withLock { nodeList } }
    /// Every attached backend.
    public var backends: [BlockBackend] { lock.withLock { backendList } }

    /// The node whose `node-name` is `name`, if the graph holds one.
    public func node(named name: String) -> BlockNode? {
        lock.withLock { nodeList.first { $0.nodeName == name } }
    }

    /// Adds `node`.
    /// - Throws: `.invalidArgument` "Duplicate nodes with node-name='NAME'" if the name is taken.
    public func add(_ node: BlockNode) throws {
        try lock.withLock {
            if nodeList.contains(where: { $0.nodeName == node.nodeName }) {
                throw BlockError(.invalidArgument, "Duplicate nodes with node-name='\(node.nodeName)'", operation: "blockdev-add")
            }
            nodeList.append(node)
        }
    }

    /// A fresh automatic node name in QEMU's style ("#block" + counter + two random digits).
    public func generateNodeName() -> String {
        lock.withLock {
            nameCounter += 1
            let n = String(nameCounter)
            let padded = String(repeating: "0", count: max(0, 3 - n.count)) + n
            let r = Int.random(in: 0..<100)
            return "#block\(padded)\(r < 10 ? "0" : "")\(r)"
        }
    }

    /// Why `node` cannot be removed now, or nil if nothing uses it.
    public func user(of node: BlockNode) -> String? {
        lock.withLock {
            if let b = backendList.first(where: { $0.node === node }) {
                return b.name.isEmpty ? "Node '\(node.nodeName)' is busy: node is in use" : "Node '\(node.nodeName)' is busy: node is used as device '\(b.name)'"
            }
            for other in nodeList where other !== node {
                if let b = other.driver.backing, b as AnyObject === node {
                    return "Node '\(node.nodeName)' is busy: node is used as backing hd of '\(other.nodeName)'"
                }
                if let f = other.driver.file, f as AnyObject === node {
                    return "Node '\(node.nodeName)' is busy: node is used as file of '\(other.nodeName)'"
                }
            }
            return nil
        }
    }

    /// Removes the node named `name` from the graph and returns it; the caller closes it.
    /// - Throws: `.notFound` "Failed to find node with node-name='NAME'", or `.busy` when
    ///   a backend or another node uses it.
    @discardableResult
    public func remove(nodeNamed name: String) throws -> BlockNode {
        guard let node = node(named: name) else {
            throw BlockError(.notFound, "Failed to find node with node-name='\(name)'", operation: "blockdev-del")
        }
        if let why = user(of: node) { throw BlockError(.busy, why, operation: "blockdev-del") }
        lock.withLock { nodeList.removeAll { $0 === node } }
        return node
    }

    /// Removes `node` without checks (rolling back a failed operation that added it).
    public func forget(_ node: BlockNode) {
        lock.withLock { nodeList.removeAll { $0 === node } }
    }

    /// Records `backend` as a user of the graph (listed by ``backends``, switched by graph
    /// changes); attaching it twice has no effect.
    public func attach(_ backend: BlockBackend) {
        lock.withLock { if !backendList.contains(where: { $0 === backend }) { backendList.append(backend) } }
    }

    /// Forgets `backend` (its device or export went away); it keeps its node.
    public func detach(_ backend: BlockBackend) {
        lock.withLock { backendList.removeAll { $0 === backend } }
    }

    /// The backends whose requests go to `node` now.
    public func backends(of node: BlockNode) -> [BlockBackend] {
        lock.withLock { backendList.filter { $0.node === node } }
    }

    /// Runs `body` with every attached backend drained (requests held, none in flight).
    /// Graph changes are serialized: one drained section at a time.
    public func drained<R>(_ body: () async throws -> R) async rethrows -> R {
        await changes.lock()
        defer { changes.unlock() }
        let all = backends
        for b in all { await b.drainBegin() }
        defer { for b in all { b.drainEnd() } }
        return try await body()
    }

    /// Switches every backend using `old` to `new`. Call inside ``drained(_:)``.
    public func replace(_ old: BlockNode, with new: BlockNode) {
        for b in backends(of: old) { b.replaceNode(new) }
    }
}
