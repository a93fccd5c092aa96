import QBlockCore
import QBlockDrivers
import QBlockGraph
import QBlockOpen

/// Opens an image from `-drive` style options, as QEMU's tools do for `json:` file names,
/// `--image-opts` and qemu-io's `open -o` (QEMU's `bdrv_open` with an options `QDict`).
///
/// The options become the `blockdev-add` tree of ``QMPBlockdevDrivers`` — so every driver
/// and filter `blockdev-add` knows can be named — with `-drive` semantics on top:
///
/// - values may be strings ("on", "42", "1M") wherever a driver reads a boolean, number or
///   size (``QMPArguments/keyval``);
/// - `driver` may be left out: the format is probed from the `file` child's first bytes;
/// - a `filename` (the `filename` parameter, or the member of a `file` child without a
///   driver) picks its protocol from ``ProtocolRegistry``; a string `file` names a node;
/// - the `backing` child may itself leave out its driver (`backing: null` opens none);
/// - options nobody reads fail with QEMU's "Block format 'qcow2' does not support the
///   option 'foo'".
///
/// The image is opened in the mode of the ``OpenOptions`` given (read-only, cache, aio,
/// force-share, snapshot, copy-on-read) unless the options say otherwise (`read-only`,
/// `cache.direct`, `cache.no-flush`, `force-share`, `file.aio`, `file.locking`), and host
/// files take the image locks ``ImageOpener`` takes. The returned node owns the whole tree:
/// closing it closes every node opened for it.
///
/// ```swift
/// let opts = try DriveOptions.parse("driver=qcow2,file.filename=/img.qcow2,l2-cache-size=1M")
/// let node = try await DriveOpener.open(filename: nil, options: opts, defaults: OpenOptions(readOnly: true))
/// defer { Task { try? await node.close() } }
/// ```
public enum DriveOpener {
    /// Opens the image `filename` (nil: named only by `options`; a `json:` name adds its
    /// options below those of `options`) with the `-drive` style `options` (dotted or
    /// nested keys), in the mode `defaults` gives.
    /// - Throws: ``QMPError`` worded as QEMU's `bdrv_open` errors (for options), or the
    ///   drivers' errors (``BlockError`` for files that cannot be opened or locked).
    public static func open(filename: String?, options: QObject.Dict, defaults: OpenOptions) async throws -> any BlockDriver {
        _ = filtersRegistered
        var flat = DriveOptions.flatten(options)
        // A format given apart from the options (-f) is one of them; the json: name's come below.
        if let f = defaults.format { flat["driver"] = .string(f) }
        var filename = filename
        if let name = filename, DriveOptions.isJSONFilename(name) {
            for (k, v) in try DriveOptions.parseJSONFilename(name).entries where flat[k] == nil { flat[k] = v }
            filename = nil
        }
        var tree = try DriveOptions.crumple(flat)
        if defaults.forceShare, tree["force-share"] == nil { tree["force-share"] = .bool(true) }
        let args = QMPArguments(tree, keyval: true)
        let readOnly = try args.optionalBool("read-only") ?? defaults.readOnly
        // The caller wants to write (QEMU's BlockBackend asks for the write permission).
        if readOnly && !defaults.readOnly { throw QMPError.generic("Block node is read-only") }
        let forceShare = try args.optionalBool("force-share") ?? false
        if forceShare && !readOnly {
            throw QMPError.generic("force-share=on can only be used with read-only images")
        }
        if let conflict = defaults.aio?.conflict(with: defaults.cache) {
            throw BlockError(.invalidArgument, conflict, operation: "open")
        }
        // Snapshot mode: the image read-only under a temporary overlay (as ImageOpener).
        let imageReadOnly = readOnly || defaults.snapshot
        tree["read-only"] = .bool(imageReadOnly)
        let session = DriveSession(defaults: defaults)
        let state = QMPBlockState(graph: BlockGraph())
        let root = try await openLevel(tree, filename: filename, protocolLevel: false, session: session, state: state,
                                       skipBacking: !defaults.openBacking)
        do {
            try session.lockRemaining(readOnly: imageReadOnly, forceShare: forceShare)
        } catch {
            try? await root.close()
            throw error
        }
        var top: any BlockDriver = root.driver
        if defaults.snapshot { top = try await ImageOpener.temporaryOverlay(above: top, options: defaults) }
        if defaults.copyOnRead && !readOnly { top = CopyOnReadNode(child: top, ownsChild: true) }
        return top
    }

    /// Makes ``ImageOpener`` open `json:{...}` names — given as an image, or recorded as a
    /// backing file — through this opener, as QEMU's `bdrv_open` does for every file name.
    /// The tools call it at start, and so does every ``QMPMonitor``; calling it again is harmless.
    public static func installJSONFilenames() {
        ImageOpener.setJSONFilenameOpener { name, options in
            do {
                return try await open(filename: name, options: QObject.Dict(), defaults: options)
            } catch let e as QMPError {
                throw BlockError(.invalidArgument, e.desc, path: name, operation: "open options")
            }
        }
    }

    /// The filters register themselves with ``QMPBlockdevDrivers`` when a monitor installs
    /// its command groups: one monitor, made once, so that every filter can be named here.
    private static let filtersRegistered: Bool = {
        _ = QMPMonitor()
        return true
    }()

    /// Opens one level of the tree (`-drive` options of one node; `protocolLevel` for a
    /// `file` child, whose driver a file name alone chooses; `skipBacking` opens no backing
    /// file the image names) and returns its node:
    /// a protocol node as it is, a format node after opening (and probing) its `file` child
    /// and its `backing` child when given as options.
    static func openLevel(_ given: QObject.Dict, filename: String?, protocolLevel: Bool, session: DriveSession,
                          state: QMPBlockState, skipBacking: Bool = false) async throws -> BlockNode {
        var opts = given
        let driver: String?
        switch opts["driver"] {
        case .string(let d)?: driver = d
        case nil: driver = nil
        default: throw QMPError.generic("Invalid parameter type for 'driver', expected: string")
        }
        if let driver, !QMPBlockdevDrivers.names.contains(driver) {
            throw QMPError.generic("Unknown driver '\(driver)'")
        }
        // A `file` child named by a file name: its protocol picks itself (QEMU opens a
        // format's `file` child as a protocol node; the top and `backing` are probed).
        if driver == nil, protocolLevel, opts["file"] == nil, let name = filename ?? stringMember(opts, "filename") {
            let proto = try ProtocolRegistry.blockdevOptions(forFilename: name)
            opts["filename"] = nil
            for (k, v) in proto.entries where opts[k] == nil { opts[k] = v }
            return try await state.open(QMPArguments(opts, keyval: true), parent: nil, isRoot: false, drive: session)
        }
        if let driver, let filter = ProtocolRegistry.prefixed.first(where: { $0.name == driver }) {
            return try await openPrefixed(filter, opts, filename: filename, session: session, state: state)
        }
        if let driver, QMPBlockdevDrivers.isProtocolLike(driver) {
            if let filename {
                if opts["filename"] != nil {
                    throw QMPError.generic("Can't specify 'file' and 'filename' options at the same time")
                }
                opts["filename"] = .string(filename)
            }
            // (A protocol driver's node is at the protocol level wherever it is, as QEMU's
            // drivers with their own file open: its filtered child is not probed either.)
            return try await state.open(QMPArguments(opts, keyval: true), parent: nil, isRoot: false, drive: session,
                                        protocolLevel: true)
        }
        let readOnly = try QMPArguments(opts, keyval: true).optionalBool("read-only") ?? false
        // The file child: options, a file name, or the file name given for this node.
        var fileOpts: QObject.Dict?
        switch opts["file"] {
        case .dict(let d)?: fileOpts = d
        case .string(let s)?:
            // A string names an existing node, as in QEMU (this opener starts with none).
            throw QMPError.noDevice(device: s, node: s)
        case nil: if filename != nil { fileOpts = QObject.Dict() }
        default: throw QMPError.generic("Invalid parameter type for 'file', expected: BlockdevRef")
        }
        var opened: [BlockNode] = []
        do {
            if var f = fileOpts {
                if f["read-only"] == nil { f["read-only"] = .bool(readOnly) }
                // The file child inherits the cache mode and force-share (QEMU's bdrv_inherited_options).
                for key in ["cache", "force-share"] where f[key] == nil { f[key] = opts[key] }
                let fileFilename = filename
                if fileFilename != nil, f["filename"] != nil {
                    throw QMPError.generic("Can't specify 'file' and 'filename' options at the same time")
                }
                let file = try await openLevel(f, filename: fileFilename, protocolLevel: true, session: session, state: state)
                opened.append(file)
                opts["file"] = .string(file.nodeName)
                if driver == nil {
                    let head = try await file.read(at: 0, count: Int(min(Int64(FormatRegistry.probeLength), file.length)))
                    guard let probed = FormatRegistry.probe(head) else {
                        throw QMPError.generic("Could not determine image format: No compatible format found")
                    }
                    opts["driver"] = .string(probed.name)
                }
            } else if driver == nil {
                throw QMPError.generic("Must specify either driver or file")
            } else if let driver, FormatRegistry.driver(named: driver) != nil {
                throw QMPError.generic("A block device must be specified for \"file\"")
            }
            // Without backing files (qemu-img info): none for a format that could have one.
            if skipBacking, opts["backing"] == nil, case .string(let f)? = opts["driver"],
               FormatRegistry.driver(named: f)?.supportsBackingFile == true {
                opts["backing"] = .null
            }
            // Backing options without a file: how to open the image's own backing file
            // (its name from the image; `backing.driver` overrides the stored format).
            var backingOverride: QObject.Dict?
            if case .dict(let b)? = opts["backing"], b["file"] == nil, b["filename"] == nil,
               case .string(let f)? = opts["driver"], FormatRegistry.driver(named: f)?.supportsBackingFile == true {
                let bd = (b["driver"]).flatMap { if case .string(let s) = $0 { return s } else { return nil } }
                if bd.map({ !QMPBlockdevDrivers.isProtocolLike($0) }) ?? true {
                    backingOverride = b
                    opts["backing"] = nil
                }
            }
            if case .dict(var b)? = opts["backing"] {
                if b["read-only"] == nil { b["read-only"] = .bool(true) }
                for key in ["cache", "force-share"] where b[key] == nil { b[key] = opts[key] }
                let backing = try await openLevel(b, filename: nil, protocolLevel: false, session: session, state: state)
                opened.append(backing)
                opts["backing"] = .string(backing.nodeName)
            } else if case .string(let s)? = opts["backing"] {
                if s.isEmpty {
                    opts["backing"] = .null
                } else if state.graph.node(named: s) == nil {
                    throw QMPError.generic("Could not open backing file: \(QMPError.noDevice(device: s, node: s).desc)")
                }
            }
            if var b = backingOverride {
                if b["read-only"] == nil { b["read-only"] = .bool(true) }
                for key in ["cache", "force-share"] where b[key] == nil { b[key] = opts[key] }
                session.pushBackingOptions(b)
            }
            let node: BlockNode
            do {
                node = try await state.open(QMPArguments(opts, keyval: true), parent: nil, isRoot: false, drive: session,
                                            protocolLevel: protocolLevel)
            } catch {
                if backingOverride != nil { _ = session.popBackingOptions() }
                throw error
            }
            if let b = backingOverride, session.popBackingOptions() != nil {
                // The image names no backing file: the options have no file to open.
                try? await node.close()
                let why = b["driver"] == nil ? "Must specify either driver or file" : "A block device must be specified for \"file\""
                throw QMPError.generic("Could not open backing file: \(why)")
            }
            return node
        } catch {
            for n in opened.reversed() { try? await n.close() }
            throw error
        }
    }

    /// A filter named by its prefixed file name (`blkdebug::IMAGE`) and by options
    /// (`driver=blkdebug,image.driver=qcow2`): the children the name names are opened with
    /// the options given for them (`image.…`), as QEMU's blkdebug opens `x-image`.
    private static func openPrefixed(_ filter: any PrefixedFilterDriver.Type, _ given: QObject.Dict, filename: String?,
                                     session: DriveSession, state: QMPBlockState) async throws -> BlockNode {
        var opts = given
        var filename = filename
        if filename == nil, let named = stringMember(opts, "filename") {
            filename = named
            opts["filename"] = nil
        }
        var parsed = PrefixedFilename(options: QObject.Dict(), children: [])
        if let filename, filename.hasPrefix(filter.filenamePrefix) {
            if opts["filename"] != nil {
                throw QMPError.generic("Can't specify 'file' and 'filename' options at the same time")
            }
            do { parsed = try filter.parseFilename(filename) } catch { throw QMPError.generic(error.asBlockError.message) }
            for (k, v) in parsed.options.entries where opts[k] == nil { opts[k] = v }
        } else {
            // Children given as options: each opened as -drive opens a child (its protocol
            // from its file name, or the driver it names); a file name without the prefix
            // names the last child (the image), as QEMU's blkdebug and blkverify take it.
            let members = prefixedChildren[filter.name] ?? []
            for (member, isImage) in members {
                let isLast = member == members.last?.0
                var given = false
                if case .dict? = opts[member] { given = true }
                guard given || (isLast && filename != nil) else { continue }
                parsed.children.append((member: member, filename: isLast ? (filename ?? "") : ""))
                if isImage { parsed.imageMembers.insert(member) }
            }
        }
        var opened: [BlockNode] = []
        do {
            for child in parsed.children {
                var childOpts = QObject.Dict()
                switch opts[child.member] {
                case .dict(let d)?: childOpts = d
                case nil: break
                default: throw QMPError.generic("Invalid parameter type for '\(child.member)', expected: BlockdevRef")
                }
                // The child inherits the mode (QEMU's bdrv_inherited_options).
                for key in ["read-only", "cache", "force-share"] where childOpts[key] == nil { childOpts[key] = opts[key] }
                let node = try await openLevel(childOpts, filename: child.filename.isEmpty ? nil : child.filename,
                                               protocolLevel: !parsed.imageMembers.contains(child.member), session: session, state: state)
                opened.append(node)
                opts[child.member] = .string(node.nodeName)
            }
            return try await state.open(QMPArguments(opts, keyval: true), parent: nil, isRoot: false, drive: session)
        } catch {
            for n in opened.reversed() { try? await n.close() }
            throw error
        }
    }

    /// The children of the prefixed filters by member, and whether each is a whole image
    /// (its format probed) rather than a protocol node: the members their file names give.
    private static let prefixedChildren: [String: [(String, Bool)]] = [
        "blkdebug": [("image", false)],
        "blkverify": [("raw", false), ("test", true)],
    ]

    private static func stringMember(_ d: QObject.Dict, _ key: String) -> String? {
        if case .string(let s)? = d[key] { return s }
        return nil
    }
}

extension QMPBlockdevDrivers {
    /// Filters QEMU opens as formats (on a `file` child); every other registered filter is
    /// reported as a protocol, as QEMU's blkdebug, blkverify, null-co and the like are.
    static let formatLikeFilters: Set<String> = ["copy-on-read", "throttle", "preallocate", "compress", "snapshot-access", "quorum"]

    /// Whether QEMU treats `driver` as a protocol (`bdrv_file_open`): the protocols of
    /// ``ProtocolRegistry`` and the registered filters that are not format-like.
    static func isProtocolLike(_ driver: String) -> Bool {
        if ProtocolRegistry.driver(named: driver) != nil { return true }
        if FormatRegistry.driver(named: driver) != nil { return false }
        return !formatLikeFilters.contains(driver)
    }
}

/// What one ``DriveOpener/open(filename:options:defaults:)`` call shares among the nodes it
/// opens: the defaults of the open, and the host files opened without locks that still
/// need them once the format above them is known.
// @unchecked: `pending` is only touched with `lock` held; the lets are immutable.
final class DriveSession: @unchecked Sendable {
    let defaults: OpenOptions
    private let mutex = PosixMutex()
    private var pending: [(node: any HostStorage, locking: Bool)] = []

    init(defaults: OpenOptions) { self.defaults = defaults }

    /// Options for the backing file the format node being opened names itself (a stack:
    /// each level pushes its own before opening its format node, whose backing opener pops it).
    private var backingOptions: [QObject.Dict] = []

    /// Pushes options for the backing file of the format node about to be opened.
    func pushBackingOptions(_ options: QObject.Dict) { mutex.withLock { backingOptions.append(options) } }

    /// Takes the options pushed for the node whose backing file is being opened, if any.
    func popBackingOptions() -> QObject.Dict? { mutex.withLock { backingOptions.popLast() } }

    /// Records a host file opened without locks (`locking`: false when the node says
    /// `locking=off`).
    func opened(_ node: any BlockDriver, locking: Bool) {
        guard let host = node as? any HostStorage else { return }
        mutex.withLock { pending.append((host, locking && defaults.locking)) }
    }

    /// Takes the locks on `file` (a node or its graph wrapper) that a node of `format`
    /// takes, if it is a pending host file.
    /// - Throws: ``BlockError`` `.locked` when another process holds a conflicting lock.
    func lock(file: any BlockDriver, format: String, readOnly: Bool, forceShare: Bool) throws {
        let inner = file.innermostDriver as AnyObject
        let entry: (node: any HostStorage, locking: Bool)? = mutex.withLock {
            guard let i = pending.firstIndex(where: { ($0.node as AnyObject) === inner }) else { return nil }
            return pending.remove(at: i)
        }
        guard let entry, entry.locking else { return }
        let (perm, shared) = permissions(format: format, readOnly: readOnly, forceShare: forceShare)
        try entry.node.lock(perm: perm, shared: shared)
    }

    /// Locks the host files no format claimed (a protocol node opened on its own) with
    /// QEMU's defaults.
    func lockRemaining(readOnly: Bool, forceShare: Bool) throws {
        let rest = mutex.withLock { () -> [(node: any HostStorage, locking: Bool)] in
            defer { pending.removeAll() }
            return pending
        }
        for e in rest where e.locking {
            let (perm, shared) = permissions(format: e.node.driverName, readOnly: e.node.isReadOnly, forceShare: forceShare)
            try e.node.lock(perm: perm, shared: shared)
        }
    }

    private func permissions(format: String, readOnly: Bool, forceShare: Bool) -> (BlockPermissions, BlockPermissions) {
        ImageOpener.lockPermissions(format: format, options: OpenOptions(readOnly: readOnly, forceShare: forceShare))
    }
}
