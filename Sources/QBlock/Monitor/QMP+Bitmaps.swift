import QBlockBitmaps
import QBlockCore
import QBlockDrivers
import QBlockGraph
/// Dirty bitmap commands (`block-dirty-bitmap-add/-remove/-clear/-enable/-disable/-merge`)
/// on a node's runtime bitmaps. Each is also a `transaction` action; the standalone
/// command runs it as a transaction of one.
extension QMPMonitor {
    func registerBitmapCommands() {
        let simple: [(String, BitmapSimpleAction.Kind)] = [
            ("block-dirty-bitmap-remove", .remove), ("block-dirty-bitmap-clear", .clear),
            ("block-dirty-bitmap-enable", .enable), ("block-dirty-bitmap-disable", .disable),
        ]
        register("block-dirty-bitmap-add") { args, ctx in
            try await QMPTransaction.run([try BitmapAddAction(args, graph: ctx.graph, block: ctx.monitor.block)], graph: ctx.graph, drain: false)
            return .dict(QObject.Dict())
        }
        for (name, kind) in simple {
            register(name) { args, ctx in
                try await QMPTransaction.run([try BitmapSimpleAction(kind, args, graph: ctx.graph)], graph: ctx.graph, drain: false)
                return .dict(QObject.Dict())
            }
        }
        register("block-dirty-bitmap-merge") { args, ctx in
            try await QMPTransaction.run([try BitmapMergeAction(args, graph: ctx.graph)], graph: ctx.graph, drain: false)
            return .dict(QObject.Dict())
        }
    }
}

enum BitmapLookup {
    static func node(_ graph: BlockGraph, _ name: String) throws -> BlockNode {
        guard let n = graph.node(named: name) else { throw QMPError.noDevice(device: name, node: name) }
        return n
    }

    static func bitmap(_ graph: BlockGraph, node: String, name: String) throws -> (BlockNode, DirtyBitmap) {
        let n = try self.node(graph, node)
        guard let b = find(n, name) else { throw QMPError.generic("Dirty bitmap '\(name)' not found") }
        return (n, b)
    }

    /// The node's persistent bitmaps, if its format stores them.
    static func persistentSet(_ node: BlockNode) -> DirtyBitmapSet? {
        (node.innermostDriver as? any PersistentBitmapStore)?.persistentBitmaps
    }

    /// Every bitmap of the node: persistent ones (the format driver marks them) and runtime ones.
    static func all(_ node: BlockNode) -> [DirtyBitmap] {
        (persistentSet(node)?.all ?? []) + node.bitmaps.all
    }

    static func find(_ node: BlockNode, _ name: String) -> DirtyBitmap? {
        persistentSet(node)?.named(name) ?? node.bitmaps.named(name)
    }

    /// QEMU's default granularity: the cluster size clamped to [4 KiB, 64 KiB], else 64 KiB.
    static func defaultGranularity(_ node: BlockNode) -> Int64 {
        if let c = node.innermostDriver as? any ClusteredFormat { return Int64(min(65536, max(4096, c.clusterSize))) }
        return 65536
    }

    static func checkUsable(_ b: DirtyBitmap) throws {
        if b.isBusy { throw QMPError.generic("Bitmap '\(b.name)' is currently in use by another operation and cannot be used") }
        if b.isInconsistent {
            throw QMPError.generic("Bitmap '\(b.name)' is inconsistent and cannot be used\nTry block-dirty-bitmap-remove to delete this bitmap from disk")
        }
    }
}

/// `block-dirty-bitmap-add`: node, name, granularity, persistent, disabled.
final class BitmapAddAction: QMPTransactionAction {
    let graph: BlockGraph
    let nodeName: String, name: String
    let granularity: UInt64?
    let persistent: Bool, disabled: Bool
    private var added: (BlockNode, DirtyBitmap, DirtyBitmapSet)?
    private weak var block: QMPBlockState?

    init(_ args: QMPArguments, graph: BlockGraph, block: QMPBlockState? = nil) throws {
        self.graph = graph
        self.block = block
        nodeName = try args.string("node")
        name = try args.string("name")
        granularity = try args.optionalUInt("granularity", bits: 32)
        persistent = try args.optionalBool("persistent") ?? false
        disabled = try args.optionalBool("disabled") ?? false
        try args.done()
    }

    func prepare() async throws {
        let node = try BitmapLookup.node(graph, nodeName)
        if name.isEmpty { throw QMPError.generic("Bitmap name cannot be empty") }
        if name.utf8.count > 1023 { throw QMPError.generic("Bitmap name too long: \(name)") }
        let g = granularity.map { Int64($0) } ?? BitmapLookup.defaultGranularity(node)
        if g < 512 || g & (g - 1) != 0 { throw QMPError.generic("Granularity must be power of 2 and at least 512") }
        if BitmapLookup.find(node, name) != nil { throw QMPError.generic("Bitmap already exists: \(name)") }
        if persistent {
            guard let q = node.innermostDriver as? any PersistentBitmapStore else {
                throw QMPError.generic("Can't store persistent bitmaps to \(nodeName): Operation not supported")
            }
            let b = try q.addPersistentBitmap(name: name, granularity: granularity.map { Int64($0) }, disabled: disabled,
                                              nodeName: nodeName)
            added = (node, b, q.persistentBitmaps)
            block?.noteBitmap(b)
            return
        }
        let b = try DirtyBitmap(name: name, size: node.length, granularity: g)
        b.isEnabled = !disabled
        try node.bitmaps.add(b)
        added = (node, b, node.bitmaps)
        block?.noteBitmap(b)
    }

    /// Nothing with writers held: the bitmap was added in ``prepare()`` (it starts
    /// recording at once, as QEMU's).
    func prepareDrained() async throws {}
    /// Nothing to switch: see ``prepareDrained()``.
    func commitDrained() {}
    /// Nothing to finish: the bitmap stays.
    func commit() async {}

    func abort() async {
        if let (_, b, set) = added { set.remove(b) }
    }
}

/// remove, clear, enable, disable: node, name.
final class BitmapSimpleAction: QMPTransactionAction {
    enum Kind { case remove, clear, enable, disable }
    let kind: Kind
    let graph: BlockGraph
    let nodeName: String, name: String
    private var target: (BlockNode, DirtyBitmap)?

    init(_ kind: Kind, _ args: QMPArguments, graph: BlockGraph) throws {
        self.kind = kind
        self.graph = graph
        nodeName = try args.string("node")
        name = try args.string("name")
        try args.done()
    }

    private var removedPersistent: (any PersistentBitmapStore)?

    func prepare() async throws {
        let (n, b) = try BitmapLookup.bitmap(graph, node: nodeName, name: name)
        if kind == .remove {
            if b.isBusy { throw QMPError.generic("Bitmap '\(name)' is currently in use by another operation and cannot be used") }
            // As QEMU: a persistent bitmap leaves the image at once; an abort puts the
            // bitmap back on the node (stored again when the node is closed).
            if b.isPersistent, let q = n.innermostDriver as? any PersistentBitmapStore, q.persistentBitmaps.named(name) === b {
                try await q.removePersistentBitmap(named: name)
                removedPersistent = q
            }
        } else {
            try BitmapLookup.checkUsable(b)
        }
        target = (n, b)
    }

    /// Nothing that may fail with writers held: the checks ran in ``prepare()``.
    func prepareDrained() async throws {}

    /// Removes, clears, enables or disables the bitmap while no write can mark it.
    func commitDrained() {
        guard let (n, b) = target else { return }
        switch kind {
        case .remove: if removedPersistent == nil { n.bitmaps.remove(b) }
        case .clear: b.clear()
        case .enable: b.isEnabled = true
        case .disable: b.isEnabled = false
        }
    }

    /// Nothing to finish once writers run again.
    func commit() async {}

    func abort() async {
        if let q = removedPersistent, let (_, b) = target { try? q.persistentBitmaps.add(b) }
    }
}

/// `block-dirty-bitmap-merge`: node, target, bitmaps (names on the node, or {node, name}).
final class BitmapMergeAction: QMPTransactionAction {
    let graph: BlockGraph
    let nodeName: String, targetName: String
    let sources: [(node: String, name: String)]
    private var resolved: (DirtyBitmap, [DirtyBitmap])?

    init(_ args: QMPArguments, graph: BlockGraph) throws {
        self.graph = graph
        nodeName = try args.string("node")
        targetName = try args.string("target")
        var s: [(String, String)] = []
        let node = nodeName
        for (i, item) in try args.list("bitmaps").enumerated() {
            switch item {
            case .string(let name): s.append((node, name))
            case .dict(let d):
                let a = QMPArguments(d, path: "bitmaps[\(i)]")
                s.append((try a.string("node"), try a.string("name")))
                try a.done()
            default:
                throw QMPError.generic("Invalid parameter type for 'bitmaps[\(i)]', expected: BlockDirtyBitmapOrStr")
            }
        }
        sources = s
        try args.done()
    }

    func prepare() async throws {
        let (_, target) = try BitmapLookup.bitmap(graph, node: nodeName, name: targetName)
        try BitmapLookup.checkUsable(target)
        var list: [DirtyBitmap] = []
        for (n, name) in sources {
            let (_, b) = try BitmapLookup.bitmap(graph, node: n, name: name)
            try BitmapLookup.checkUsable(b)
            if b.size != target.size {
                throw QMPError.generic("Bitmaps are of different sizes (destination size is \(target.size), source size is \(b.size)) and can't be merged")
            }
            list.append(b)
        }
        resolved = (target, list)
    }

    /// Nothing that may fail with writers held: the checks ran in ``prepare()``.
    func prepareDrained() async throws {}

    /// Merges the sources into the target while no write can mark them.
    func commitDrained() {
        guard let (t, list) = resolved else { return }
        for b in list { try? t.merge(from: b) }
    }

    /// Nothing to finish once writers run again.
    func commit() async {}

    /// Nothing to undo: ``prepare()`` only checked.
    func abort() async {}
}
