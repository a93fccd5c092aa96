#if canImport(Glibc)
import Glibc
#endif
import QBlockBitmaps
import QBlockCore
import QBlockDrivers
import QBlockGraph
import QBlockJobs
/// What the block commands keep besides the graph: which nodes the monitor added (only
/// those `blockdev-del` accepts), the nodes each one created implicitly (its `file`, an
/// auto-opened backing chain), and per-node open options for `query-named-block-nodes`.
// @unchecked Sendable: every var is only touched with `lock` held; `graph` is thread-safe.
public final class QMPBlockState: @unchecked Sendable {
    struct NodeInfo {
        var cache: CacheMode
        var noFlush: Bool
        var detectZeroes: String
        /// `discard`: "unmap" lets discard requests through to the image, "ignore" drops them.
        var discard: String = "ignore"
        /// Nodes created with this one that go away with it (children first).
        var implicit: [BlockNode]
    }

    let graph: BlockGraph
    private let lock = PosixMutex()
    private var owned: [String] = []
    private var info: [ObjectIdentifier: NodeInfo] = [:]
    private var slots: [ObjectIdentifier: Int] = [:]
    /// Nodes that go away when nothing uses them any more (snapshot overlays, as in QEMU).
    private var autoDelete: [BlockNode] = []
    /// Nodes reported read-only since a snapshot made them a backing image (QEMU reopens them so).
    private var reportedReadOnly = Set<ObjectIdentifier>()
    /// The permissions of backends that are users in ``QMPPermissions`` (exports), while
    /// they are attached to the graph.
    private var rootEdges: [(backend: BlockBackend, edge: QMPPermissions.Edge)] = []

    private var bitmapSeq: [ObjectIdentifier: Int] = [:]
    private var bitmapCounter = 0

    /// Records a new bitmap's age (QEMU lists a node's bitmaps newest first).
    func noteBitmap(_ b: DirtyBitmap) {
        lock.withLock { bitmapCounter += 1; bitmapSeq[ObjectIdentifier(b)] = bitmapCounter }
    }

    /// The node's bitmaps, persistent and runtime, newest first (bitmaps loaded from the
    /// image count as older than any added since, in directory order).
    func orderedBitmaps(_ node: BlockNode) -> [DirtyBitmap] {
        let all = BitmapLookup.all(node)
        let seqs: [Int] = lock.withLock {
            all.map { b in
                if let s = bitmapSeq[ObjectIdentifier(b)] { return s }
                bitmapCounter += 1
                bitmapSeq[ObjectIdentifier(b)] = bitmapCounter
                return bitmapCounter
            }
        }
        return zip(all, seqs).sorted { $0.1 > $1.1 }.map(\.0)
    }

    func setAutoDelete(_ node: BlockNode) { lock.withLock { autoDelete.append(node) } }

    /// Nodes a running job uses (counted): garbage collection leaves them alone, since the
    /// graph does not see a job's references.
    private var held: [ObjectIdentifier: Int] = [:]

    /// Marks `nodes` as used by a job until ``release(_:)``.
    func hold(_ nodes: [BlockNode]) {
        lock.withLock { for n in nodes { held[ObjectIdentifier(n), default: 0] += 1 } }
    }

    /// Ends a ``hold(_:)``.
    func release(_ nodes: [BlockNode]) {
        lock.withLock {
            for n in nodes {
                let k = ObjectIdentifier(n)
                if let c = held[k] { held[k] = c > 1 ? c - 1 : nil }
            }
        }
    }

    /// Holds `nodes` while `job` runs, then deletes the implicitly created nodes it left
    /// unused (a cancelled drive-mirror's target, a pivoted mirror's old source that was a
    /// snapshot overlay), which flushes and closes them, as QEMU drops its last reference.
    func holdWhileRunning(_ job: Job, _ nodes: [BlockNode]) {
        hold(nodes)
        Task {
            await job.waitConcluded()
            self.release(nodes)
            await self.collectGarbage()
        }
    }

    func markReadOnly(_ node: BlockNode) {
        lock.withLock {
            reportedReadOnly.insert(ObjectIdentifier(node))
            if let f = node.driver.file as? BlockNode { reportedReadOnly.insert(ObjectIdentifier(f)) }
        }
    }

    /// Records `backend`'s permissions (before it is attached to the graph); entries of
    /// backends no longer attached are dropped.
    func setRootUserEdge(_ backend: BlockBackend, _ edge: QMPPermissions.Edge) {
        let attached = graph.backends
        lock.withLock {
            rootEdges.removeAll { e in e.backend === backend || !attached.contains { $0 === e.backend } }
            rootEdges.append((backend, edge))
        }
    }

    /// The permissions `backend` takes as a user of its node, if it is one.
    func rootUserEdge(_ backend: BlockBackend) -> QMPPermissions.Edge? {
        lock.withLock { rootEdges.first { $0.backend === backend }?.edge }
    }

    func isReportedReadOnly(_ node: BlockNode) -> Bool { lock.withLock { reportedReadOnly.contains(ObjectIdentifier(node)) } }

    /// Deletes auto-deleted nodes nothing uses any more (after an export or a job let go).
    func collectGarbage() async {
        while true {
            let candidates = lock.withLock { autoDelete }
            let busy = lock.withLock { Set(held.keys) }
            guard let victim = candidates.first(where: { graph.user(of: $0) == nil && !busy.contains(ObjectIdentifier($0)) }) else { return }
            lock.withLock { autoDelete.removeAll { $0 === victim } }
            try? await delete(victim)
        }
    }
    private var slotCounter = 0

    func nextSlot() -> Int { lock.withLock { slotCounter += 1; return slotCounter } }

    /// The graph's nodes in QEMU's `query-named-block-nodes` order: newest first, a node
    /// before its file, its backing chain before the node it was opened with. (Nodes added
    /// to the graph by others take their place when first seen.)
    var nodesInQemuOrder: [BlockNode] {
        let nodes = graph.nodes
        let order: [Int] = lock.withLock {
            nodes.map { n in
                if let s = slots[ObjectIdentifier(n)] { return s }
                slotCounter += 1
                slots[ObjectIdentifier(n)] = slotCounter
                return slotCounter
            }
        }
        return zip(nodes, order).sorted { $0.1 > $1.1 }.map(\.0)
    }

    init(graph: BlockGraph) { self.graph = graph }

    func isMonitorOwned(_ name: String) -> Bool { lock.withLock { owned.contains(name) } }
    func setMonitorOwned(_ node: BlockNode, implicit: [BlockNode]) {
        lock.withLock {
            owned.append(node.nodeName)
            info[ObjectIdentifier(node), default: NodeInfo(cache: .writeback, noFlush: false, detectZeroes: "off", implicit: [])].implicit = implicit
        }
    }
    func nodeInfo(_ node: BlockNode) -> NodeInfo? { lock.withLock { info[ObjectIdentifier(node)] } }

    /// Records the options a `blockdev-reopen` gave `node`; its read-only state is the
    /// node's own from then on (no longer reported read-only because of a snapshot).
    func setReopenedOptions(_ node: BlockNode, cache: CacheMode, noFlush: Bool, detectZeroes: String, discard: String) {
        lock.withLock {
            var i = info[ObjectIdentifier(node)] ?? NodeInfo(cache: cache, noFlush: noFlush, detectZeroes: detectZeroes, implicit: [])
            i.cache = cache
            i.noFlush = noFlush
            i.detectZeroes = detectZeroes
            i.discard = discard
            info[ObjectIdentifier(node)] = i
            reportedReadOnly.remove(ObjectIdentifier(node))
        }
    }

    /// Whether `child` was created with `parent` (QEMU: it inherits its options from it, so a
    /// reopen of the parent reopens it too).
    func isImplicitChild(_ child: BlockNode, of parent: BlockNode) -> Bool {
        lock.withLock { info[ObjectIdentifier(parent)]?.implicit.contains { $0 === child } ?? false }
    }

    /// A node that takes another's place (a snapshot overlay, a drive-mirror target) opens
    /// with that node's `discard` choice, as QEMU reuses its open flags (detect-zeroes is not
    /// one of them).
    func inheritOptions(_ node: BlockNode, from old: BlockNode) {
        lock.withLock {
            guard let src = info[ObjectIdentifier(old)] else { return }
            info[ObjectIdentifier(node), default: NodeInfo(cache: src.cache, noFlush: src.noFlush, detectZeroes: "off", implicit: [])].discard = src.discard
        }
    }

    /// Opens a node tree from `blockdev-add` arguments and adds every node to the graph.
    /// On failure, whatever was created is closed and removed.
    /// A backing child is opened read-only unless it says otherwise (QEMU's default for a
    /// child holding the older data); a file child takes its parent's mode.
    /// With `drive` (or a parent opened so), the node is opened for ``DriveOpener``: host
    /// files without locks until the format above them is known, the cache mode inherited or
    /// from the session's defaults, `force-share` honoured.
    /// `protocolLevel`: a ``DriveOpener`` node in a format's `file` place (see ``QMPOpenContext``).
    func open(_ args: QMPArguments, parent: QMPOpenContext?, isRoot: Bool, isBacking: Bool = false,
              drive: DriveSession? = nil, protocolLevel: Bool = false) async throws -> BlockNode {
        let session = drive ?? parent?.drive
        let driver = try args.enumValue("driver", QMPBlockdevDrivers.names)
        let nodeName = try args.optionalString("node-name")
        if isRoot && nodeName == nil { throw QMPError.generic("'node-name' must be specified for the root node") }
        if let nodeName { try Self.checkNodeName(nodeName) }
        let readOnly = try args.optionalBool("read-only") ?? (isBacking || (parent?.readOnly ?? false))
        var direct = parent?.cache.direct ?? false
        var noFlush = false
        if let session, args.dict["cache"] == nil {
            let inherited = parent?.cache ?? session.defaults.cache
            direct = inherited.direct
            noFlush = inherited.ignoresFlush
        }
        if let cache = try args.optionalObject("cache") {
            direct = try cache.optionalBool("direct") ?? direct
            noFlush = try cache.optionalBool("no-flush") ?? false
            try cache.done()
        }
        let discard = try args.optionalEnum("discard", ["ignore", "unmap"]) ?? "ignore"
        let detectZeroes = try args.optionalEnum("detect-zeroes", ["off", "on", "unmap"]) ?? "off"
        let autoReadOnly = try args.optionalBool("auto-read-only") ?? (parent?.autoReadOnly ?? false)
        let forceShare = try args.optionalBool("force-share") ?? (parent?.forceShare ?? false)
        var cache: CacheMode = noFlush ? .unsafe : (direct ? .none : .writeback)
        if let session {
            if forceShare && !readOnly { throw QMPError.generic("force-share=on can only be used with read-only images") }
            // Keep writethrough and directsync, which cache.direct/no-flush cannot spell.
            let inherited = parent?.cache ?? session.defaults.cache
            if inherited.direct == direct && inherited.ignoresFlush == noFlush { cache = inherited }
            args.owner = (driver, QMPBlockdevDrivers.isProtocolLike(driver))
        }
        if let nodeName, graph.node(named: nodeName) != nil {
            throw QMPError.generic("Duplicate nodes with node-name='\(nodeName)'")
        }
        guard let opener = QMPBlockdevDrivers.opener(driver) else {
            throw QMPError.generic("Parameter 'driver' does not accept value '\(driver)'")
        }
        var ctx = QMPOpenContext(readOnly: readOnly, cache: cache, graph: graph, block: self, drive: session, forceShare: forceShare,
                                 autoReadOnly: autoReadOnly, driver: driver, nodeName: nodeName, protocolLevel: protocolLevel)
        let discardUnmap = args.dict["discard"] == nil ? (session?.defaults.discardUnmap ?? false) : discard == "unmap"
        ctx.discardUnmap = discardUnmap
        let opened: any BlockDriver
        do {
            opened = try await opener(args, ctx)
        } catch let error where autoReadOnly && !readOnly && QMPBlockdevDrivers.isProtocolLike(driver) && Self.isWriteDenied(error) {
            // auto-read-only: a host file the process may only read opens read-only (a
            // writer above it then fails, as in QEMU, where the file reopens read-write
            // when a writer attaches).
            await rollBack(ctx.created)
            ctx = QMPOpenContext(readOnly: true, cache: cache, graph: graph, block: self, drive: session, forceShare: forceShare,
                                 autoReadOnly: autoReadOnly, driver: driver, nodeName: nodeName, protocolLevel: protocolLevel)
            ctx.discardUnmap = discardUnmap
            do {
                opened = try await opener(args, ctx)
            } catch {
                await rollBack(ctx.created)
                throw error
            }
        } catch {
            await rollBack(ctx.created)
            throw error
        }
        let node = BlockNode(nodeName: nodeName ?? graph.generateNodeName(), driver: opened)
        do {
            try graph.add(node)
        } catch {
            try? await opened.close()
            for n in ctx.created { graph.forget(n) }
            throw error
        }
        let slot = ctx.slot ?? nextSlot()
        lock.withLock {
            info[ObjectIdentifier(node)] = NodeInfo(cache: cache, noFlush: noFlush, detectZeroes: detectZeroes, discard: discard,
                                                    implicit: ctx.created)
            slots[ObjectIdentifier(node)] = slot
        }
        parent?.created.append(contentsOf: ctx.created + [node])
        return node
    }

    /// Whether `error` is the host refusing write access (EACCES, EPERM, EROFS).
    static func isWriteDenied(_ error: any Error) -> Bool {
        guard let e = error as? BlockError, let errno = e.errno else { return false }
        return errno == EACCES || errno == EPERM || errno == EROFS
    }

    /// Closes and forgets the nodes a failed open created (children before their parents in
    /// `nodes`), leaving open any existing node they used (``closeTree(_:owned:)``).
    private func rollBack(_ nodes: [BlockNode]) async {
        for n in nodes.reversed() { graph.forget(n) }
        let created = Set(nodes.map { ObjectIdentifier($0) })
        var closed = Set<ObjectIdentifier>()
        for n in nodes.reversed() where !closed.contains(ObjectIdentifier(n)) {
            if let q = n.innermostDriver as? any BackingLinked, let b = q.backing as? BlockNode, !created.contains(ObjectIdentifier(b)) {
                q.setBackingNode(nil)
            }
            try? await closeTree(n, owned: created)
            var c: (any BlockDriver)? = n
            while let d = c as? BlockNode, d === n || created.contains(ObjectIdentifier(d)) { closed.insert(ObjectIdentifier(d)); c = d.driver.file }
        }
    }

    /// Closes `top` and the `file` children below it that are in `owned` (nodes it created),
    /// but no node outside `owned`: a level whose child chain leaves `owned` (a node named
    /// in `file` that the monitor holds, perhaps below an implicit raw or filter) closes
    /// leaving its file open (``FileSharingClose``; a driver without it only flushes).
    func closeTree(_ top: BlockNode, owned: Set<ObjectIdentifier>) async throws {
        func chainOwned(_ start: BlockNode) -> Bool {
            var c: BlockNode? = start
            var depth = 0
            while let n = c, depth < 64 {
                if !owned.contains(ObjectIdentifier(n)) { return false }
                c = n.driver.file as? BlockNode
                depth += 1
            }
            return true
        }
        var n = top
        for _ in 0..<64 {
            guard let f = n.driver.file as? BlockNode, !chainOwned(f) else {
                try await n.close()
                return
            }
            if let c = n.innermostDriver as? any FileSharingClose { try await c.closeLeavingFileOpen() } else { try await n.flush() }
            guard owned.contains(ObjectIdentifier(f)) else { return }
            n = f
        }
    }

    static func checkNodeName(_ name: String) throws {
        let ok = name.utf8.count < 32 && (name.first?.isLetter ?? false)
            && name.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "-" || $0 == "_" || $0 == ".") }
        if !ok { throw QMPError.generic("Invalid node-name: '\(name)'") }
    }

    /// Why `node` cannot be deleted, in QEMU's words and order (`qmp_blockdev_del`), or nil.
    func busyReason(_ node: BlockNode) -> String? {
        if !graph.backends(of: node).isEmpty { return "Node \(node.nodeName) is in use" }
        if let why = graph.user(of: node), why.contains("backing hd") { return why }
        if !isMonitorOwned(node.nodeName) { return "Node \(node.nodeName) is not owned by the monitor" }
        if graph.user(of: node) != nil { return "Block device \(node.nodeName) is in use" }
        return nil
    }

    /// Removes a monitor-owned node and the nodes it created, and closes them; a backing
    /// node that is not its own (a snapshot's old top) is unlinked first and stays open.
    func delete(_ node: BlockNode) async throws {
        let implicit = nodeInfo(node)?.implicit ?? []
        let mine = Set(implicit.map { ObjectIdentifier($0) })
        if let q = node.innermostDriver as? any BackingLinked, let b = q.backing as? BlockNode, !mine.contains(ObjectIdentifier(b)) {
            q.setBackingNode(nil)
        }
        graph.forget(node)
        for n in implicit { graph.forget(n) }
        lock.withLock {
            owned.removeAll { $0 == node.nodeName }
            autoDelete.removeAll { $0 === node }
            reportedReadOnly.remove(ObjectIdentifier(node))
            info[ObjectIdentifier(node)] = nil
            slots[ObjectIdentifier(node)] = nil
            for n in implicit { info[ObjectIdentifier(n)] = nil; slots[ObjectIdentifier(n)] = nil }
        }
        // A file that is another node of the graph (named in `file`, perhaps below an
        // implicit raw or filter) stays open.
        try await closeTree(node, owned: mine)
    }

    /// Closes every node the monitor added or created (snapshot overlays too), overlays
    /// before their backing nodes, whatever users remain (at shutdown).
    public func closeAll() async {
        while true {
            let candidates: [BlockNode] = lock.withLock { owned.compactMap { graph.node(named: $0) } + autoDelete }
            guard !candidates.isEmpty else { return }
            let nodes = graph.nodes
            let free = candidates.filter { n in
                !nodes.contains { o in o !== n && ((o.driver.backing as AnyObject?) === n || (o.driver.file as AnyObject?) === n) }
            }
            for n in free.isEmpty ? candidates : free { try? await delete(n) }
        }
    }

    /// Flushes every node still in the graph (at shutdown, after ``closeAll()``): a node
    /// nobody owns any more must still not lose an acknowledged write.
    public func flushRemaining() async {
        for n in graph.nodes { try? await n.flush() }
    }
}

extension QMPMonitor {
    /// The block commands' state (owned nodes, open options).
    public var block: QMPBlockState { state(QMPBlockState.self) { QMPBlockState(graph: graph) } }

    func registerBlockCommands() {
        register("blockdev-add") { args, ctx in
            let block = ctx.monitor.block
            let node = try await block.open(args, parent: nil, isRoot: true)
            block.setMonitorOwned(node, implicit: block.nodeInfo(node)?.implicit ?? [])
            return .dict(QObject.Dict())
        }
        register("blockdev-del") { args, ctx in
            let name = try args.string("node-name")
            try args.done()
            let block = ctx.monitor.block
            guard let node = ctx.graph.node(named: name) else {
                throw QMPError.generic("Failed to find node with node-name='\(name)'")
            }
            if let why = block.busyReason(node) { throw QMPError.generic(why) }
            try await block.delete(node)
            // Its implicit backing nodes (a snapshot's old top) may be unused now: QEMU drops
            // them with their last reference.
            await block.collectGarbage()
            return .dict(QObject.Dict())
        }
        register("query-named-block-nodes") { args, ctx in
            let flat = try args.optionalBool("flat") ?? false
            try args.done()
            let block = ctx.monitor.block
            return .list(block.nodesInQemuOrder.map { block.deviceInfo($0, flat: flat) })
        }
    }
}
