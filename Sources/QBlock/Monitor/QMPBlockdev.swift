import QBlockCore
import QBlockDrivers
import QBlockGraph
import QBlockNBDServer
import QBlockOpen
/// The drivers `blockdev-add` knows, by QAPI name: the formats of ``FormatRegistry``, the
/// protocols of ``ProtocolRegistry``, and the filters registered here. A driver reads its
/// own members from the arguments (the common ones — `driver`, `node-name`, `read-only`,
/// `cache`, `discard`, `detect-zeroes`, `auto-read-only`, `force-share` — are read before it
/// is called) and returns the opened driver; children (`file`, `backing`, a filter's child)
/// are opened with ``QMPOpenContext/child(_:_:)``. A format reads its members through
/// ``FormatDriver/readBlockdevOptions(_:into:)``, a protocol through
/// ``ProtocolDriver/readBlockdevOptions(_:)``; a format's `file` and `backing` children are
/// opened here.
///
/// A filter from another file registers itself once, before use:
/// ```swift
/// QMPBlockdevDrivers.register("copy-on-read") { args, ctx in
///     let child = try await ctx.child(args, "file")
///     try args.done()
///     return CopyOnReadFilter(child: child)
/// }
/// ```
public enum QMPBlockdevDrivers {
    /// Opens a driver from its `blockdev-add` arguments.
    public typealias Opener = @Sendable (QMPArguments, QMPOpenContext) async throws -> any BlockDriver

    private static let lock = PosixMutex()
    // @unchecked: the opener table is only read or changed with `Self.lock` held.
    nonisolated(unsafe) private static var table: [String: Opener] = [:]

    /// Adds (or replaces) a filter driver `name` (formats are in ``FormatRegistry``,
    /// protocols in ``ProtocolRegistry``).
    public static func register(_ name: String, opener: @escaping Opener) {
        lock.withLock { table[name] = opener }
    }

    /// The driver names, sorted.
    public static var names: [String] {
        Set(lock.withLock { Array(table.keys) } + Array(builtInFilters.keys) + FormatRegistry.names + ProtocolRegistry.names).sorted()
    }

    static func opener(_ name: String) -> Opener? {
        if let o = lock.withLock({ table[name] }) { return o }
        if let o = builtInFilters[name] { return o }
        if let proto = ProtocolRegistry.driver(named: name) {
            return { args, ctx in try await openProtocol(proto, args, ctx) }
        }
        guard let format = FormatRegistry.driver(named: name) else { return nil }
        return { args, ctx in try await openFormat(format, args, ctx) }
    }
}

/// What a `blockdev-add` driver opener gets besides its arguments: the open mode, the graph,
/// and a way to open or look up its children. Nodes it creates are recorded so that a
/// failed `blockdev-add` closes them again and `blockdev-del` removes them with their parent.
// @unchecked: `created` and `slot` are only used by the one command that owns this context,
// sequentially (commands run under the monitor's `commandLock`); the lets are immutable or thread-safe.
public final class QMPOpenContext: @unchecked Sendable {
    /// Open read-only (`read-only`).
    public let readOnly: Bool
    /// Host cache mode from `cache.direct` / `cache.no-flush`.
    public let cache: CacheMode
    /// The graph the nodes go into.
    public let graph: BlockGraph
    let block: QMPBlockState
    /// Nodes created while opening (children first), for ownership and rollback.
    var created: [BlockNode] = []
    /// The node's place in QEMU's node list, taken once its `file` child is open (QEMU names
    /// a node after opening its file and before opening its backing file).
    var slot: Int?
    /// Set when the tree is opened for ``DriveOpener`` (`-drive` semantics); nil for `blockdev-add`.
    let drive: DriveSession?
    /// `force-share`: the node takes only consistent reads and shares everything (read-only nodes).
    let forceShare: Bool
    /// For ``DriveOpener``: the node is opened at the protocol level (QEMU's
    /// `BDRV_O_PROTOCOL`, a format's `file` child or a filter in that place), so that a
    /// filtered child named by a file name alone is opened by the protocol that name picks
    /// rather than probed for a format.
    let protocolLevel: Bool
    /// Whether the node being opened owns its children and must close them when it is closed
    /// (true when ``DriveOpener`` opens the tree, whose root owns every node; false for
    /// `blockdev-add`, where the monitor tracks the nodes). A filter passes it on to its node.
    public var ownsChildren: Bool { drive != nil }

    /// `auto-read-only` (inherited by implicit children): a host file that cannot be
    /// opened for writing is opened read-only instead.
    let autoReadOnly: Bool

    /// The node's discard mode is `unmap` (`discard`; ``DriveOpener`` trees default to the
    /// session's, the tools' `unmap`): formats pass guest discards on to their files.
    var discardUnmap = false

    /// The driver of the node being opened and its `node-name`, if given (for the
    /// permission check of the children it takes).
    let driver: String
    let nodeName: String?

    init(readOnly: Bool, cache: CacheMode, graph: BlockGraph, block: QMPBlockState, drive: DriveSession? = nil, forceShare: Bool = false,
         autoReadOnly: Bool = false, driver: String = "", nodeName: String? = nil, protocolLevel: Bool = false) {
        self.driver = driver
        self.nodeName = nodeName
        self.autoReadOnly = autoReadOnly
        self.readOnly = readOnly
        self.cache = cache
        self.graph = graph
        self.block = block
        self.drive = drive
        self.forceShare = forceShare
        self.protocolLevel = protocolLevel
    }

    /// Opens child `key` of `args`: a nested object is opened as a new (implicit) node, a
    /// string names an existing node. Returns nil when the member is absent. A writable node
    /// needs its children other than `backing` writable too: a read-only one fails with
    /// QEMU's "Block node is read-only" (its permission check), never a node that claims to
    /// be writable over a file it cannot write.
    public func optionalChild(_ args: QMPArguments, _ key: String) async throws -> BlockNode? {
        guard let v = args.value(key) else { return nil }
        let child: BlockNode
        switch v {
        case .string(let name):
            guard let n = graph.node(named: name) else { throw QMPError.noDevice(device: name, node: name) }
            child = n
        case .dict(let d):
            if let session = drive, d["driver"] == nil, key != "backing" {
                // -drive semantics: a child without a driver is named by a file name (the
                // child of a filter takes the filter's level: a protocol, or probed).
                var c = d
                if c["read-only"] == nil { c["read-only"] = .bool(readOnly) }
                if forceShare, c["force-share"] == nil { c["force-share"] = .bool(true) }
                var filename: String?
                if !protocolLevel, case .string(let name)? = c["filename"] {
                    filename = name
                    c["filename"] = nil
                }
                let node = try await DriveOpener.openLevel(c, filename: filename, protocolLevel: protocolLevel, session: session, state: block)
                created.append(node)
                child = node
            } else {
                child = try await block.open(QMPArguments(d, path: args.name(key), keyval: args.keyval), parent: self, isRoot: false, isBacking: key == "backing")
            }
        default:
            throw QMPError.generic("Invalid parameter type for '\(args.name(key))', expected: BlockdevRef")
        }
        if !readOnly && key != "backing" && child.isReadOnly { throw QMPError.generic("Block node is read-only") }
        try checkPermissions(attaching: child, as: key, parentName: { nodeName ?? graph.generateNodeName() })
        return child
    }

    /// Like ``optionalChild(_:_:)`` for a mandatory child ("Parameter 'file' is missing").
    public func child(_ args: QMPArguments, _ key: String) async throws -> BlockNode {
        guard let n = try await optionalChild(args, key) else { throw args.missing(key) }
        if key == "file" && slot == nil { slot = block.nextSlot() }
        return n
    }
}

extension QMPBlockdevDrivers {
    /// A protocol node: the driver's own members, then (nothing left over) the open.
    static func openProtocol(_ proto: any ProtocolDriver.Type, _ args: QMPArguments, _ ctx: QMPOpenContext) async throws -> any BlockDriver {
        let open = try proto.readBlockdevOptions(args)
        try args.done()
        if let session = ctx.drive, case .string(let filename)? = args.dict["filename"] {
            // -drive semantics: opened by name without locks; the format above takes them
            // (DriveSession), or none with `locking=off`.
            var o = OpenOptions(readOnly: ctx.readOnly, cache: ctx.cache, locking: false)
            o.aio = session.defaults.aio
            if case .string(let a)? = args.dict["aio"] { o.aio = AIOMode(qemuName: a) }
            let node: any BlockDriver
            do {
                node = try await proto.open(filename: filename, options: o)
            } catch let e as BlockError {
                throw BlockError(e.code, "Could not open '\(filename)': \(e.message)", errno: e.errno, path: filename,
                                 operation: proto.openOperation, underlying: e.underlying)
            }
            let lockingOff = args.dict["locking"] == .string("off") || args.dict["locking"] == .bool(false)
            session.opened(node, locking: !lockingOff)
            return node
        }
        return try await open(ctx.readOnly, ctx.cache)
    }

    /// A format node: the format's own members, then `file`, then (for a format with
    /// backing files) `backing` — absent: the image's own backing file, null: none, a node
    /// name or an object: that node.
    static func openFormat(_ format: any FormatDriver.Type, _ args: QMPArguments, _ ctx: QMPOpenContext) async throws -> any BlockDriver {
        var options = OpenOptions(format: format.name, readOnly: ctx.readOnly, cache: ctx.cache, locking: false)
        options.discardUnmap = ctx.discardUnmap
        if let session = ctx.drive {
            options.allowCorrupt = session.defaults.allowCorrupt
            options.forRepair = session.defaults.forRepair && !ctx.readOnly
        }
        try format.readBlockdevOptions(args, into: &options)
        let backingValue = format.supportsBackingFile ? args.value("backing") : nil
        let file = try await ctx.child(args, "file")
        var explicitBacking: BlockNode?
        if let backingValue, backingValue != .null {
            explicitBacking = try await ctx.optionalChild(args, "backing")
        }
        try args.done()
        options.openBacking = format.supportsBackingFile && backingValue == nil
        let imageName = file.filename
        let node = try await format.open(file: file, options: options) { name, format in
            if let session = ctx.drive, var given = session.popBackingOptions() {
                // Options for the image's own backing file (`backing.driver=qcow2`): over
                // those of a `json:` name, else on the file the name resolves to.
                do {
                    var filename: String?
                    if DriveOptions.isJSONFilename(name) {
                        let named = try DriveOptions.crumple(try DriveOptions.parseJSONFilename(name))
                        for (k, v) in named.entries where given[k] == nil { given[k] = v }
                    } else {
                        filename = ImageOpener.resolveBackingPath(name, relativeTo: ProtocolRegistry.imagePath(forFilename: imageName))
                    }
                    if let format, given["driver"] == nil { given["driver"] = .string(format) }
                    return try await DriveOpener.openLevel(given, filename: filename, protocolLevel: false, session: session, state: ctx.block)
                } catch {
                    throw QMPError.generic("Could not open backing file: \(QMPError.from(error).desc)")
                }
            }
            if let session = ctx.drive, DriveOptions.isJSONFilename(name) {
                // A backing file named by options (-drive semantics; the tree's root owns it).
                do {
                    var opts = try DriveOptions.crumple(try DriveOptions.parseJSONFilename(name))
                    if let format, opts["driver"] == nil { opts["driver"] = .string(format) }
                    if opts["read-only"] == nil { opts["read-only"] = .bool(true) }
                    if ctx.forceShare, opts["force-share"] == nil { opts["force-share"] = .bool(true) }
                    return try await DriveOpener.openLevel(opts, filename: nil, protocolLevel: false, session: session, state: ctx.block)
                } catch {
                    throw QMPError.generic("Could not open backing file: \(QMPError.from(error).desc)")
                }
            }
            let path = ImageOpener.resolveBackingPath(name, relativeTo: ProtocolRegistry.imagePath(forFilename: imageName))
            var fmt = "raw"
            if let format { fmt = format } else if let probed = await ImageOpener.probeFormat(of: path) { fmt = probed }
            do {
                // The backing file's protocol (a host file, an NBD URI) from its name.
                let fileArgs = try ProtocolRegistry.blockdevOptions(forFilename: path)
                let d = QObject.Dict([("driver", .string(fmt)), ("read-only", .bool(true)), ("file", .dict(fileArgs))])
                return try await ctx.block.open(QMPArguments(d, path: "backing"), parent: ctx, isRoot: false)
            } catch {
                throw QMPError.generic("Could not open backing file: \(QMPError.from(error).desc)")
            }
        }
        if let session = ctx.drive {
            do {
                try session.lock(file: file, format: format.name, readOnly: ctx.readOnly, forceShare: ctx.forceShare)
            } catch {
                try? await node.close()
                throw error
            }
        }
        if let explicitBacking {
            guard let linked = node as? any BackingLinked else {
                try? await node.close()
                throw QMPError.generic("Driver '\(format.name)' does not support backing files")
            }
            linked.setBackingNode(explicitBacking)
        }
        return node
    }
}

/// QAPI's `SocketAddress` (flat: `{"type": "unix", "path": …}`) and `SocketAddressLegacy`
/// (`{"type": "unix", "data": {"path": …}}`, used by `nbd-server-start`), read as the NBD
/// client driver reads its `server` (``NBDURI/Transport/init(socketAddress:legacy:)``).
enum QMPSocketAddress {
    static func parse(_ a: QMPArguments, legacy: Bool) throws -> NBDServer.Address {
        switch try NBDURI.Transport(socketAddress: a, legacy: legacy) {
        case .unix(let path): return .unix(path: path)
        case .tcp(let host, let port): return .tcp(host: host, port: port)
        }
    }
}

/// The members of a `blockdev-add` or `blockdev-create` options object, as a format driver reads them.
extension QMPArguments: DriverOptionReader {
    /// QEMU's "Parameter 'NAME' is missing" for the member `key`.
    public func missingError(_ key: String) -> any Error { missing(key) }

    /// A QAPI `size` member; a negative number is taken as is.
    /// - Throws: ``QMPError`` "Parameter 'NAME' expects uint64" if the member is not a number.
    public func optionalSize(_ key: String) throws -> Int64? {
        guard let v = value(key) else { return nil }
        if keyval, case .string(let text) = v {
            guard let n = KeyvalValue.size(text) else { throw KeyvalValue.sizeError(name(key)) }
            return Int64(bitPattern: n)
        }
        guard case .int(let i) = v else { throw QMPError.generic("Parameter '\(name(key))' expects uint64") }
        return i
    }

    /// A member of QAPI's `BlockdevDriver` enum.
    /// - Throws: ``QMPError`` if the member is not a string naming a driver QEMU knows.
    public func optionalDriverName(_ key: String) throws -> String? {
        try optionalEnum(key, QMPMonitor.blockdevDriverNames)
    }

    /// A nested object member as a reader of its own (``optionalObject(_:)``).
    /// - Throws: ``QMPError`` "Invalid parameter type for 'NAME', expected: object".
    public func optionalObjectMembers(_ key: String) throws -> (any DriverOptionReader)? {
        try optionalObject(key)
    }
}
