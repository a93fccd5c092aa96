import QBlockCore
import QBlockGraph
import QBlockNBDServer
import QBlockOpen
import QBlockDrivers
/// `blockdev-reopen` (QEMU 7.2's `qapi/block-core.json`): gives existing nodes a new set
/// of options, all of them or none. Each list element is a full `BlockdevOptions` naming an
/// existing node; options left out go back to their defaults.
///
/// What changes: `read-only` (both ways), `cache` (`direct`, `no-flush`), `discard` and
/// `detect-zeroes`, on `file` nodes and the nodes of every registered format. The node object stays the same —
/// exports, overlays' backing links and jobs keep using it — because the drivers switch
/// mode in place (``ReopenableDriver``): a `file` node moves to a new descriptor, a format
/// node stores its bitmaps and flushes before refusing writes.
///
/// Children follow QEMU's rules: a child given as the name of its current node is reopened
/// with its current options, taking from the parent only what the parent sets explicitly
/// (`read-only`, `cache`), and only when the child was created with the parent; a child
/// given as options is reopened with those. Replacing a `file` or `backing` child by another
/// node, or dropping the backing node (`null`), is refused here, as are driver options we
/// cannot change in place (raw `offset`/`size`, file `locking`/`aio`, qcow2's options other
/// than `lazy-refcounts` and the cache sizes, which change as ``Qcow2RuntimeOptions``).
extension QMPMonitor {
    func registerReopenCommands() {
        register("blockdev-reopen") { args, ctx in
            let elements = try args.list("options")
            var specs: [ReopenSpec] = []
            for (i, e) in elements.enumerated() {
                guard case .dict(let d) = e else {
                    throw QMPError.generic("Invalid parameter type for '\(args.name("options"))[\(i)]', expected: object")
                }
                specs.append(try ReopenSpec.parse(QMPArguments(d, path: "\(args.name("options"))[\(i)]")))
            }
            try args.done()
            var roots: [(ReopenSpec, BlockNode)] = []
            for spec in specs {
                guard let name = spec.nodeName else { throw QMPError.generic("node-name not specified") }
                guard let node = ctx.graph.node(named: name) else {
                    throw QMPError.generic("Failed to find node with node-name='\(name)'")
                }
                roots.append((spec, node))
            }
            let plan = ReopenPlan(graph: ctx.graph, block: ctx.monitor.block, nbd: ctx.monitor.nbd)
            for (spec, node) in roots { try plan.add(spec, node, parent: nil) }
            try plan.checkPermissions()
            try await ctx.graph.drained { try await plan.apply() }
            plan.record()
            return .dict(QObject.Dict())
        }
    }
}

/// One parsed `BlockdevOptions` of `blockdev-reopen` (the top level or a child's options).
// @unchecked: built by the parser and then only read, by the one `blockdev-reopen` command (one task)
// that owns it; never shared while mutated.
final class ReopenSpec: @unchecked Sendable {
    // @unchecked: immutable after parsing.
    /// A child member: absent, `null`, a node name, or options.
    enum Child {
        case null
        case name(String)
        case options(ReopenSpec)
    }

    var driver = ""
    var nodeName: String?
    var readOnly: Bool?
    var direct: Bool?
    var noFlush: Bool?
    var discard: String?
    var detectZeroes: String?
    var filename: String?
    var file: Child?
    var backing: Child?
    var hasBacking = false
    /// Driver members given that this implementation cannot change in place, in order.
    var fixedMembers: [(String, QObject)] = []
    /// A qcow2 node's runtime options (those left out go back to their defaults).
    var qcow2Options: Qcow2RuntimeOptions?

    /// Reads the members as `blockdev-add` does, in the schema's order, without opening anything.
    static func parse(_ a: QMPArguments) throws -> ReopenSpec {
        let s = ReopenSpec()
        s.driver = try a.enumValue("driver", QMPMonitor.blockdevDriverNames)
        s.nodeName = try a.optionalString("node-name")
        s.discard = try a.optionalEnum("discard", ["ignore", "unmap"])
        if let cache = try a.optionalObject("cache") {
            s.direct = try cache.optionalBool("direct")
            s.noFlush = try cache.optionalBool("no-flush")
            try cache.done()
        }
        s.readOnly = try a.optionalBool("read-only")
        if let v = try a.optionalBool("auto-read-only"), v { s.fixedMembers.append(("auto-read-only", .bool(v))) }
        if let v = try a.optionalBool("force-share"), v { s.fixedMembers.append(("force-share", .bool(v))) }
        s.detectZeroes = try a.optionalEnum("detect-zeroes", ["off", "on", "unmap"])
        if let proto = ProtocolRegistry.driver(named: s.driver) {
            if let given = try proto.readReopenOptions(a) {
                s.filename = given.filename
                s.fixedMembers += given.fixedMembers
            } else {
                // A protocol whose nodes cannot be reopened: its members are not checked (the
                // reopen fails on the node's driver).
                a.markAllRead()
            }
        } else if let format = FormatRegistry.driver(named: s.driver) {
            // A format's own members (none can change in place), read as blockdev-add reads them.
            let members = RecordingReader(a)
            var read = OpenOptions()
            try format.readBlockdevOptions(members, into: &read)
            var given = members.given
            if let q = read.formatOptions as? Qcow2RuntimeOptions {
                // qcow2's runtime options change in place (Qcow2Node.reopen(options:)).
                s.qcow2Options = q
                given.removeAll { Qcow2RuntimeOptions.keys.contains($0.0) }
            }
            s.fixedMembers += given
            if format.supportsBackingFile {
                s.hasBacking = a.value("backing") != nil
                s.backing = try child(a, "backing", nullable: true)
            }
            s.file = try child(a, "file", nullable: false)
            if s.file == nil { throw a.missing("file") }
        } else {
            // Drivers we cannot open: their members are not checked (the node cannot be of
            // that driver, so the reopen fails on the driver anyway).
            a.markAllRead()
        }
        try a.done()
        return s
    }

    private static func child(_ a: QMPArguments, _ key: String, nullable: Bool) throws -> Child? {
        guard let v = a.value(key) else { return nil }
        switch v {
        case .null where nullable: return .null
        case .string(let n): return .name(n)
        case .dict(let d): return .options(try parse(QMPArguments(d, path: a.name(key))))
        default:
            // QEMU's alternate visitor names the member without its path.
            throw QMPError.generic("Invalid parameter type for '\(key)', expected: \(nullable ? "BlockdevRefOrNull" : "BlockdevRef")")
        }
    }
}

/// The nodes a `blockdev-reopen` changes and their new options: built and checked before
/// anything changes, then applied inside one drained section (undone on failure).
// @unchecked: `targets` is built and applied by the one `blockdev-reopen` command (one task) that owns
// the plan; the lets are immutable or thread-safe.
final class ReopenPlan: @unchecked Sendable {
    // @unchecked: used by one command at a time (the monitor serializes commands).
    struct Target {
        let node: BlockNode
        var readOnly: Bool
        var direct: Bool
        var noFlush: Bool
        var discard: String
        var detectZeroes: String
        /// New runtime options for a qcow2 node (nil: unchanged).
        var qcow2: Qcow2RuntimeOptions? = nil
        var cache: CacheMode { noFlush ? .unsafe : (direct ? .none : .writeback) }
    }
    /// What a child takes from its parent: the values the parent sets (explicitly or by inheritance).
    struct Inherited {
        var readOnly: Bool?
        var direct: Bool?
        var noFlush: Bool?
        var isBacking: Bool
    }

    let graph: BlockGraph
    let block: QMPBlockState
    let nbd: QMPNBDState
    private(set) var targets: [Target] = []

    init(graph: BlockGraph, block: QMPBlockState, nbd: QMPNBDState) {
        self.graph = graph
        self.block = block
        self.nbd = nbd
    }

    private func index(of node: BlockNode) -> Int? { targets.firstIndex { $0.node === node } }

    /// Adds `spec` for `node` and, recursively, the children it reopens.
    func add(_ spec: ReopenSpec, _ node: BlockNode, parent: Inherited?) throws {
        if node.driverName != spec.driver { throw QMPError.generic("Cannot change the option 'driver'") }
        if let n = spec.nodeName, n != node.nodeName { throw QMPError.generic("Cannot change the option 'node-name'") }
        if let f = spec.filename, f != node.filename { throw QMPError.generic("Cannot change the option 'filename'") }
        let discard = spec.discard ?? "ignore"
        let detectZeroes = spec.detectZeroes ?? "off"
        if detectZeroes == "unmap" && discard != "unmap" {
            throw QMPError.generic("setting detect-zeroes to unmap is not allowed without setting discard operation to unmap")
        }
        guard node.driver is any ReopenableDriver else {
            throw QMPError.generic("Block format '\(node.driverName)' used by node '\(node.nodeName)' does not support reopening files")
        }
        if let (key, _) = spec.fixedMembers.first {
            throw QMPError.generic("blockdev-reopen: changing '\(key)' of node '\(node.nodeName)' is not supported by this implementation")
        }
        // A backing child is read-only unless it says otherwise; a file child takes the parent's mode.
        let readOnly = parent?.isBacking == true ? (spec.readOnly ?? true) : (spec.readOnly ?? parent?.readOnly ?? false)
        let direct = spec.direct ?? parent?.direct ?? false
        let noFlush = spec.noFlush ?? parent?.noFlush ?? false
        var t = Target(node: node, readOnly: readOnly, direct: direct, noFlush: noFlush, discard: discard, detectZeroes: detectZeroes)
        if let q = spec.qcow2Options, let qcow2 = node.innermostDriver as? Qcow2Node {
            do { try qcow2.checkReopen(options: q) } catch { throw QMPError.from(error) }
            t.qcow2 = q
        }
        if let i = index(of: node) { targets[i] = t } else { targets.append(t) }
        let inherit = Inherited(readOnly: spec.readOnly ?? parent?.readOnly, direct: spec.direct ?? parent?.direct,
                                noFlush: spec.noFlush ?? parent?.noFlush, isBacking: false)

        // backing: must be given when the image has a backing file (QEMU's rule).
        if FormatRegistry.driver(named: spec.driver)?.supportsBackingFile == true {
            let current = node.driver.backing as? BlockNode
            let named = (node.innermostDriver as? any BackingLinked)?.backingFileName
            if !spec.hasBacking && (node.driver.backing != nil || named != nil) {
                throw QMPError.generic("backing is missing for '\(node.nodeName)'")
            }
            var b = inherit
            b.isBacking = true
            try child(spec.backing, current: current, of: node, role: "backing", inherit: b)
        }
        try child(spec.file, current: node.driver.file as? BlockNode, of: node, role: "file", inherit: inherit)
    }

    private func child(_ c: ReopenSpec.Child?, current: BlockNode?, of node: BlockNode, role: String, inherit: Inherited) throws {
        switch c {
        case nil:
            return
        case .null?:
            if current != nil {
                throw QMPError.generic("blockdev-reopen: detaching the backing node of '\(node.nodeName)' is not supported by this implementation")
            }
        case .name(let name)?:
            guard let other = graph.node(named: name) else {
                throw QMPError.generic("Cannot find device='' nor node-name='\(name)'")
            }
            guard let current, other === current else {
                throw QMPError.generic("blockdev-reopen: replacing the \(role) child of '\(node.nodeName)' (with '\(name)') is not supported by this implementation")
            }
            // The current child keeps its options, taking what the parent sets explicitly;
            // only a child created with the parent is reopened with it. A backing node
            // named so keeps its mode (QEMU reopens it read-only unless its own options
            // say otherwise, which is how it was opened).
            guard role == "file", index(of: current) == nil, block.isImplicitChild(current, of: node) else { return }
            let info = block.nodeInfo(current)
            let cache = info?.cache ?? .writeback
            let t = Target(node: current, readOnly: inherit.readOnly ?? current.isReadOnly,
                           direct: inherit.direct ?? cache.direct, noFlush: inherit.noFlush ?? (info?.noFlush ?? false),
                           discard: info?.discard ?? "ignore", detectZeroes: info?.detectZeroes ?? "off")
            targets.append(t)
            try grandchildren(of: current, inherit: Inherited(readOnly: inherit.readOnly, direct: inherit.direct,
                                                             noFlush: inherit.noFlush, isBacking: false))
        case .options(let spec)?:
            guard let current else {
                throw QMPError.generic("blockdev-reopen: adding a \(role) child to '\(node.nodeName)' is not supported by this implementation")
            }
            if let n = spec.nodeName, n != current.nodeName {
                throw QMPError.generic("blockdev-reopen: replacing the \(role) child of '\(node.nodeName)' (with '\(n)') is not supported by this implementation")
            }
            guard block.isImplicitChild(current, of: node) else {
                throw QMPError.generic("Cannot change the option '\(role).driver'")
            }
            try add(spec, current, parent: inherit)
        }
    }

    /// A child reopened with its current options reopens its own implicit children likewise.
    private func grandchildren(of node: BlockNode, inherit: Inherited) throws {
        for (c, isBacking) in [(node.driver.file as? BlockNode, false), (node.driver.backing as? BlockNode, true)] {
            guard let c, isBacking == false else { continue }   // a backing node keeps its mode
            guard index(of: c) == nil, block.isImplicitChild(c, of: node) else { continue }
            let info = block.nodeInfo(c)
            let cache = info?.cache ?? .writeback
            targets.append(Target(node: c, readOnly: inherit.readOnly ?? c.isReadOnly, direct: inherit.direct ?? cache.direct,
                                  noFlush: inherit.noFlush ?? (info?.noFlush ?? false),
                                  discard: info?.discard ?? "ignore", detectZeroes: info?.detectZeroes ?? "off"))
            try grandchildren(of: c, inherit: inherit)
        }
    }

    private func willBeReadOnly(_ n: BlockNode) -> Bool { index(of: n).map { targets[$0].readOnly } ?? n.isReadOnly }

    /// QEMU's permission checks after the reopen: a writable node needs a writable file;
    /// a node going read-only must have no writer (a writable export, a device, a
    /// writable parent using it as its file).
    func checkPermissions() throws {
        for t in targets {
            if !t.readOnly, let f = t.node.driver.file as? BlockNode, willBeReadOnly(f), writesToFile(t.node) {
                throw Self.readOnlyError(f)
            }
            if t.readOnly && !t.node.isReadOnly && hasWriters(t.node) { throw Self.readOnlyError(t.node) }
        }
    }

    /// Whether writable `node` (after the reopen) writes to its file: a format with
    /// metadata always, a pass-through format (raw) only for its own writers.
    private func writesToFile(_ node: BlockNode) -> Bool {
        node.innermostDriver is any PassThroughFormat ? hasWriters(node) : true
    }

    /// Whether something needs to write to `node` after the reopen: a writable export, a
    /// device, a writable parent that writes to it as its file.
    private func hasWriters(_ node: BlockNode) -> Bool {
        if nbd.all.contains(where: { $0.backend.node === node && !$0.export.options.readOnly }) { return true }
        if graph.backends(of: node).contains(where: { !$0.name.isEmpty }) { return true }
        return graph.nodes.contains { p in
            p !== node && (p.driver.file as AnyObject?) === node && !willBeReadOnly(p) && writesToFile(p)
        }
    }

    private static func readOnlyError(_ n: BlockNode) -> QMPError {
        n.isReadOnly ? .generic("Block node is read-only")
            : .generic("Read-only block node '\(n.nodeName)' cannot support read-write users")
    }

    /// Switches the drivers: read-only ones parents first, writable ones children first,
    /// so that a format node never writes to a read-only file. Call with writers held.
    func apply() async throws {
        var done: [(any ReopenableDriver, Bool, CacheMode)] = []
        var optionsDone: [(Qcow2Node, Qcow2RuntimeOptions)] = []
        func step(_ t: Target) async throws {
            guard let d = t.node.driver as? any ReopenableDriver else { return }
            let before = (t.node.isReadOnly, block.nodeInfo(t.node).map { $0.noFlush ? CacheMode.unsafe : $0.cache } ?? .writeback)
            try await d.reopen(readOnly: t.readOnly, cache: t.cache)
            done.append((d, before.0, before.1))
            if let q = t.qcow2, let qcow2 = t.node.innermostDriver as? Qcow2Node, q != qcow2.runtimeOptions {
                let previous = qcow2.runtimeOptions
                try await qcow2.reopen(options: q)
                optionsDone.append((qcow2, previous))
            }
        }
        do {
            for t in targets where t.readOnly { try await step(t) }
            for t in targets.reversed() where !t.readOnly { try await step(t) }
        } catch {
            // Undo in reverse order; a failure here leaves the node as it is, still usable.
            for (q, previous) in optionsDone.reversed() { try? await q.reopen(options: previous) }
            for (d, ro, cache) in done.reversed() where !ro { try? await d.reopen(readOnly: false, cache: cache) }
            for (d, ro, cache) in done where ro { try? await d.reopen(readOnly: true, cache: cache) }
            throw QMPError.from(error)
        }
    }

    /// Records the new options (for queries and for exports of the nodes).
    func record() {
        for t in targets {
            block.setReopenedOptions(t.node, cache: t.cache, noFlush: t.noFlush,
                                     detectZeroes: t.detectZeroes, discard: t.discard)
            for e in nbd.all where e.backend.node === t.node {
                e.export.writePolicy.set(discard: t.discard == "unmap" ? .unmap : .ignore,
                                         detectZeroes: NBDExport.DetectZeroes(rawValue: t.detectZeroes) ?? .off)
            }
        }
    }
}

/// The members a format reads, forwarded to the arguments and noted when present: in a
/// reopen none of them can change, so any given is refused by name.
private final class RecordingReader: DriverOptionReader {
    let args: QMPArguments
    private(set) var given: [(String, QObject)] = []

    init(_ args: QMPArguments) { self.args = args }

    private func note<T>(_ key: String, _ read: T) -> T {
        if let v = args.dict[key], !given.contains(where: { $0.0 == key }) { given.append((key, v)) }
        return read
    }

    func name(_ key: String) -> String { args.name(key) }
    func value(_ key: String) -> QObject? { note(key, args.value(key)) }
    func missingError(_ key: String) -> any Error { args.missingError(key) }
    func optionalBool(_ key: String) throws -> Bool? { note(key, try args.optionalBool(key)) }
    func optionalInt(_ key: String) throws -> Int64? { note(key, try args.optionalInt(key)) }
    func optionalUInt(_ key: String, bits: Int) throws -> UInt64? { note(key, try args.optionalUInt(key, bits: bits)) }
    func optionalString(_ key: String) throws -> String? { note(key, try args.optionalString(key)) }
    func optionalEnum(_ key: String, _ values: [String]) throws -> String? { note(key, try args.optionalEnum(key, values)) }
    func optionalSize(_ key: String) throws -> Int64? { note(key, try args.optionalSize(key)) }
    func optionalDriverName(_ key: String) throws -> String? { note(key, try args.optionalDriverName(key)) }
    func optionalObjectMembers(_ key: String) throws -> (any DriverOptionReader)? { note(key, try args.optionalObjectMembers(key)) }
    func done() throws { try args.done() }
}
