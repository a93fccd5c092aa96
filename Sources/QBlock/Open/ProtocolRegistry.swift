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
    public static let builtIn: [any ProtocolDriver.Type] = [FileProtocol.self, NBDProtocol.self]

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
        guard let plain = builtIn.first(where: { $0.uriSchemes.isEmpty }) else {
            preconditionFailure("ProtocolRegistry.builtIn has no driver for plain host paths")
        }
        return plain
    }

    /// The `blockdev-add` options object that opens `filename` with the driver that claims
    /// it (`{"driver": "file", "filename": …}` for a host path).
    /// - Throws: ``BlockError`` when that driver cannot open such a name (a malformed URI).
    public static func blockdevOptions(forFilename filename: String) throws -> QObject.Dict {
        try driver(forFilename: filename).blockdevOptions(filename: filename)
    }
}
