import QBlockCore
import QBlockGraph
/// The raw format driver as the registry sees it (``FormatDriver``): it claims any file as
/// a last resort, opens a ``RawNode`` over the file (or a window of it), creates a plain
/// host file, and measures to the virtual size.
public enum RawFormat: FormatDriver {
    /// The format name in options and `qemu-img info` (`raw`).
    public static let name = "raw"

    /// Raw has no signature to look at.
    public static let probeLength = 0

    /// Any file may be raw: the lowest score, so that every other format wins (QEMU's `raw_probe`).
    public static func probe(_ head: [UInt8]) -> Int { 1 }

    /// The window of the file the node shows (`blockdev-add`'s `offset` and `size`).
    struct Window: FormatOpenOptions {
        var offset: Int64
        var size: Int64?
    }

    /// Opens `file` as a raw image: a ``RawNode`` over the `offset`/`size` window from
    /// ``readBlockdevOptions(_:into:)`` (the whole file by default). Raw images have no backing
    /// file, so `openBacking` is never called. Opened read-only (`options.readOnly`), the node
    /// refuses writes even when its file is writable (a read-only node over a shared file).
    /// A format found by probing (``OpenOptions/formatProbe``) makes a probed node.
    public static func open(file: any BlockDriver, options: OpenOptions,
                            openBacking: (_ name: String, _ format: String?) async throws -> any BlockDriver) async throws -> any BlockDriver {
        let window = options.formatOptions as? Window ?? Window(offset: 0, size: nil)
        try RawNode.checkWindow(offset: window.offset, size: window.size, fileLength: (file.length + 511) / 512 * 512)
        let node = RawNode(file: file, offset: window.offset, size: window.size, probe: options.formatProbe)
        if options.readOnly { node.setReadOnly(true) }
        return node
    }

    /// Raw passes its users' writes through: it shares everything, and writes (without
    /// resizing) only when writable.
    public static func filePermissions(readOnly: Bool) -> (perm: BlockPermissions, shared: BlockPermissions) {
        readOnly ? ([.consistentRead], .all) : ([.consistentRead, .write], .all)
    }

    /// Raw images cannot have a backing file.
    public static let supportsBackingFile = false
    /// Raw images cannot store compressed clusters (`qemu-img convert -c` refuses them).
    public static let supportsCompressedWrites = false

    /// The `-o` options `qemu-img create -f raw` accepts: `size` (bytes), `preallocation`
    /// (`off`, `falloc`, `full`) and `extent_size_hint` (bytes; 0 disables it).
    public static let createOptions: [CreateOption] = [
        CreateOption("size", .size, help: "Virtual disk size"),
        CreateOption("nocow", .bool, help: "Turn off copy-on-write (valid only on btrfs)", protocolLevel: true),
        CreateOption("preallocation", .string, help: "Preallocation mode (allowed values: off, falloc, full)", protocolLevel: true),
        CreateOption("extent_size_hint", .size, help: "Extent size hint for the image file, 0 to disable", protocolLevel: true),
    ]

    /// A host file of the size (rounded up to whole sectors), as QEMU's file driver makes it.
    public static func create(path: String, size: Int64, options: [(String, String)]) async throws {
        var prealloc = Preallocation.off
        if let p = options.last(where: { $0.0 == "preallocation" })?.1 {
            guard let mode = Preallocation(rawValue: p) else {
                throw BlockError(.invalidArgument, "invalid parameter value: \(p)", path: path, operation: "create")
            }
            prealloc = mode
        }
        var hint: Int64?
        if let h = options.last(where: { $0.0 == "extent_size_hint" })?.1 {
            // (ImageCreator checked the syntax already, as for every `.size` option.)
            guard let v = SizeParser.parse(h) else {
                throw BlockError(.invalidArgument, "Parameter 'extent_size_hint' expects a non-negative number below 2^64", path: path, operation: "create")
            }
            try FileCreation.checkExtentSizeHint(v, path: path)
            hint = v
        }
        let nocow = options.last(where: { $0.0 == "nocow" }).map { CreateOption.parseBool($0.1) == true } ?? false
        try await FileCreation.create(path: path, size: size, preallocation: prealloc, nocow: nocow, extentSizeHint: hint)
    }

    /// Reads the raw driver's `blockdev-add` members: `offset` and `size` (bytes, QEMU's
    /// `raw` window over its file).
    /// - Throws: ``BlockError`` `.invalidArgument` for a member of the wrong type or range.
    public static func readBlockdevOptions(_ m: any DriverOptionReader, into options: inout OpenOptions) throws {
        let offset = try m.optionalUInt("offset", bits: 64) ?? 0
        let size = try m.optionalUInt("size", bits: 64)
        options.formatOptions = Window(offset: Int64(offset), size: size.map { Int64($0) })
    }
}

extension RawFormat: ExistingNodeCreatable {
    /// raw passes its options to the protocol: the node must hold `size` bytes, and the
    /// preallocation is the protocol's to refuse.
    public static func protocolRequest(size: Int64, options: [(String, String)]) -> (minimumSize: Int64, preallocation: String?) {
        (size, options.last(where: { $0.0 == "preallocation" })?.1)
    }

    /// A raw image is the node's bytes as they are: there is nothing more to write (the
    /// first sector was cleared with the node's checks).
    public static func create(on file: any BlockDriver, size: Int64, options: [(String, String)]) async throws {}
}

extension RawFormat: Measurable {
    /// Raw has no options that only `qemu-img measure` accepts.
    public static let measureOnlyOptions: [String] = []

    /// QEMU's `raw_measure`: the virtual size (of the source, else `size`), in whole sectors.
    public static func measure(options: [String: String], source: MeasureSource?) async throws -> MeasureResult {
        let required = source?.length ?? Int64(options["size"] ?? "0") ?? 0
        let rounded = (required + 511) / 512 * 512
        return MeasureResult(required: rounded, fullyAllocated: rounded)
    }
}
