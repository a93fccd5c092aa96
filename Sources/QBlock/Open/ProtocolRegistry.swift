import QBlockCore
import QBlockDrivers
import QBlockGraph
/// The one list of protocol drivers this build has, beside ``FormatRegistry``'s formats.
/// Everything that chooses where an image's bytes live looks it up here: ``ImageOpener``
/// by file name, `blockdev-add`, `blockdev-reopen` and `blockdev-create` by `driver`, and
/// the monitor when it turns a backing file or overlay name into `blockdev-add` options.
/// Adding a protocol is its folder under `Drivers/Backends/` (with its ``ProtocolDriver``
/// type) and one entry in ``builtIn``.
public enum ProtocolRegistry {
    /// The registered protocols. The order is the order ``names`` lists them in.
    public static let builtIn: [any ProtocolDriver.Type] = [FileProtocol.self, NBDProtocol.self, NullCoProtocol.self, NullAioProtocol.self]

    /// The drivers file names claim by a prefix (`blkdebug:CONFIG:IMAGE`,
    /// `blkverify:RAW:TEST`), whose nodes sit above the nodes the rest of the name names.
    /// A name is checked against these before the URI schemes of ``builtIn``.
    public static let prefixed: [any PrefixedFilterDriver.Type] = [BlkdebugProtocol.self, BlkverifyProtocol.self]

    /// The registered protocol names ("file", "nbd").
    public static var names: [String] { builtIn.map { $0.name } }

    /// The driver named `name`, or nil when no protocol has that name.
    public static func driver(named name: String) -> (any ProtocolDriver.Type)? {
        builtIn.first { $0.name == name }
    }

    /// The driver that opens `filename`: the one claiming its URI scheme (the part before
    /// `://`, without case), else the driver of plain host paths (QEMU's
    /// `bdrv_find_protocol`, which falls back to `file`).
    public static func driver(forFilename filename: String) -> any ProtocolDriver.Type {
        if let r = filename.range(of: "://") {
            let scheme = filename[..<r.lowerBound].lowercased()
            if let d = builtIn.first(where: { $0.uriSchemes.contains(scheme) }) { return d }
        }
        if let d = builtIn.first(where: { $0.claimsLegacyFilename(filename) }) { return d }
        guard let plain = builtIn.first(where: { $0.uriSchemes.isEmpty }) else {
            preconditionFailure("ProtocolRegistry.builtIn has no driver for plain host paths")
        }
        return plain
    }

    /// `filename` without an explicit `file:` protocol prefix (`file:/a:b.qcow2` names
    /// `/a:b.qcow2`), as QEMU's file driver strips it; a rest with a colon before its first
    /// slash would read as another protocol's prefix, so it becomes "./REST" (QEMU's
    /// `bdrv_parse_filename_strip_prefix`). Any other name is returned as it is.
    public static func strippingFilePrefix(_ filename: String) -> String {
        guard filename.hasPrefix("file:") else { return filename }
        let rest = String(filename.dropFirst(5))
        guard let colon = rest.firstIndex(of: ":") else { return rest }
        if let slash = rest.firstIndex(of: "/"), slash < colon { return rest }
        return "./" + rest
    }

    /// The prefixed driver that claims `filename` (`blkdebug:…`), or nil.
    public static func prefixedDriver(forFilename filename: String) -> (any PrefixedFilterDriver.Type)? {
        prefixed.first { filename.hasPrefix($0.filenamePrefix) }
    }

    /// Opens the node that holds the bytes of the image named `filename`, below its format:
    /// for a prefixed name (`blkdebug:CONFIG:IMAGE`) the filter above the nodes it names
    /// (opened in turn by name, so they may be prefixed too; a child the driver wants as a
    /// whole image is opened with its format probed), else the node of the protocol that
    /// claims the name. No image locks are taken, as ``ProtocolDriver/open(filename:options:)``.
    /// - Throws: ``BlockError`` from parsing the name or opening a node (nodes already
    ///   opened are closed again).
    public static func openNode(filename: String, options: OpenOptions) async throws -> any BlockDriver {
        guard let filter = prefixedDriver(forFilename: filename) else {
            return try await driver(forFilename: filename).open(filename: filename, options: options)
        }
        let parsed = try filter.parseFilename(filename)
        var children: [any BlockDriver] = []
        do {
            for child in parsed.children {
                if parsed.imageMembers.contains(child.member) {
                    var o = options
                    o.format = nil
                    o.snapshot = false
                    o.copyOnRead = false
                    children.append(try await ImageOpener.open(child.filename, options: o))
                } else {
                    children.append(try await openNode(filename: child.filename, options: options))
                }
            }
            return try await filter.open(parsed, children: children, options: options)
        } catch {
            for c in children { try? await c.close() }
            throw error
        }
    }

    /// The first `count` bytes (fewer for a shorter node) of a node ``openNode(filename:options:)``
    /// opened for `filename`, for probing its format.
    /// - Throws: ``BlockError`` when they cannot be read.
    public static func probeHead(of node: any BlockDriver, filename: String, count: Int) async throws -> [UInt8] {
        if prefixedDriver(forFilename: filename) != nil {
            return try await node.read(at: 0, count: Int(min(Int64(count), node.length)))
        }
        return try await driver(forFilename: filename).probeHead(of: node, count: count)
    }

    /// The operation of the "Could not open" errors for `filename` (see
    /// ``ProtocolDriver/openOperation``); a prefixed name's is its innermost child's.
    public static func openOperation(forFilename filename: String) -> String {
        if let filter = prefixedDriver(forFilename: filename),
           let last = (try? filter.parseFilename(filename))?.children.last {
            return openOperation(forFilename: last.filename)
        }
        return driver(forFilename: filename).openOperation
    }

    /// The name relative backing file names are resolved against for the image `filename`:
    /// the name itself, or for a prefixed name the image it ends with (as QEMU resolves a
    /// backing file of `blkdebug::IMAGE` next to IMAGE).
    public static func imagePath(forFilename filename: String) -> String {
        if let filter = prefixedDriver(forFilename: filename),
           let last = (try? filter.parseFilename(filename))?.children.last {
            return imagePath(forFilename: last.filename)
        }
        return filename
    }

    /// The `blockdev-add` options object that opens `filename` with the driver that claims
    /// it (`{"driver": "file", "filename": …}` for a host path; for a prefixed name the
    /// filter's members with its children's objects).
    /// - Throws: ``BlockError`` when that driver cannot open such a name (a malformed URI).
    public static func blockdevOptions(forFilename filename: String) throws -> QObject.Dict {
        guard let filter = prefixedDriver(forFilename: filename) else {
            return try driver(forFilename: filename).blockdevOptions(filename: filename)
        }
        let parsed = try filter.parseFilename(filename)
        var d = QObject.Dict([("driver", .string(filter.name))])
        for (k, v) in parsed.options.entries { d[k] = v }
        for child in parsed.children {
            let file = try blockdevOptions(forFilename: child.filename)
            if parsed.imageMembers.contains(child.member) {
                let format = (try? ImageOpener.probe(child.filename)) ?? "raw"
                d[child.member] = .dict(QObject.Dict([("driver", .string(format)), ("file", .dict(file))]))
            } else {
                d[child.member] = .dict(file)
            }
        }
        return d
    }
}
