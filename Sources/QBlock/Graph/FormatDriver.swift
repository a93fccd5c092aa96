import QBlockCore
/// A format driver as the registry sees it (QEMU's `BlockDriver` of a format): its name,
/// how to recognize it, open it and create it. Each format implements it once, in its own
/// folder, on a type of its own (`Qcow2Format`, `RawFormat`), and is listed once in
/// ``FormatRegistry/builtIn``; ``ImageOpener``, `blockdev-add`, ``ImageCreator`` and
/// ``Measure`` find it there by name.
///
/// What a format can do beyond this is a refining protocol (``Measurable``,
/// ``BlockdevCreatable``) on the driver type, or a capability protocol on its open nodes
/// (`Capabilities.swift`).
public protocol FormatDriver: Sendable {
    /// The name as QEMU spells it (`-f`, `driver`): "qcow2", "raw".
    static var name: String { get }

    /// How many bytes from the start of a file ``probe(_:)`` looks at.
    static var probeLength: Int { get }
    /// How sure the driver is that a file starting with `head` is in its format (QEMU's
    /// `bdrv_probe`): 0 not at all, 1 as a last resort (raw), 100 certain (a magic number).
    /// `head` may be shorter than ``probeLength`` for a short file.
    static func probe(_ head: [UInt8]) -> Int

    /// Opens the format on `file`, an open protocol node the new node then owns.
    /// - Parameters:
    ///   - options: the open mode and format options (``OpenOptions/openBacking`` says
    ///     whether to open the backing file the image names).
    ///   - openBacking: opens a backing file by the name and format the image records; the
    ///     caller resolves relative names and detects loops.
    /// - Throws: ``BlockError`` (`.corrupt`, `.unsupported`, ...) without the "Could not
    ///   open" prefix, which the caller adds.
    static func open(file: any BlockDriver, options: OpenOptions,
                     openBacking: (_ name: String, _ format: String?) async throws -> any BlockDriver) async throws -> any BlockDriver

    /// The permissions a node of this format takes on its file and shares with other
    /// users, as QEMU's driver does (for the image locks).
    static func filePermissions(readOnly: Bool) -> (perm: BlockPermissions, shared: BlockPermissions)

    /// Whether images of this format can have a backing file (`-b`, `backing`, snapshot overlays).
    static var supportsBackingFile: Bool { get }
    /// Whether images of this format can store compressed clusters (`convert -c`); its
    /// nodes are then ``CompressedWriting``.
    static var supportsCompressedWrites: Bool { get }

    /// The `-o` options `qemu-img create` takes for this format, in the order qemu-img
    /// prints them in its "Formatting ..." line.
    static var createOptions: [CreateOption] { get }
    /// Creates an image at `path` as `qemu-img create` does.
    /// - Parameters:
    ///   - size: the virtual size in bytes, as given (a format rounds as QEMU's does).
    ///   - options: the `-o` values the caller checked against ``createOptions`` (sizes and
    ///     numbers normalized, booleans as "on"/"off"), in ``createOptions`` order, without `size`.
    /// - Throws: ``BlockError`` worded as qemu-img's messages after "qemu-img: FILE: ".
    static func create(path: String, size: Int64, options: [(String, String)]) async throws

    /// Reads this format's own `blockdev-add` members (all but the common ones, `file` and
    /// `backing`) into `options`, in its schema's order.
    /// - Throws: the reader's errors for members of the wrong type.
    static func readBlockdevOptions(_ members: any DriverOptionReader, into options: inout OpenOptions) throws
}

extension BlockPermissions {
    /// QEMU's default permissions of a format node on its file (`bdrv_default_perms` for a
    /// format that writes metadata): it reads and, when writable, writes and resizes; it
    /// shares reading and unchanged writes only.
    public static func formatDefaults(readOnly: Bool) -> (perm: BlockPermissions, shared: BlockPermissions) {
        readOnly ? ([.consistentRead], [.consistentRead, .writeUnchanged])
            : ([.consistentRead, .write, .resize], [.consistentRead, .writeUnchanged])
    }
}

/// A format whose image size can be computed before converting to it (`qemu-img measure`,
/// QEMU's `bdrv_measure`).
public protocol Measurable: FormatDriver {
    /// Options measure accepts for this format besides ``FormatDriver/createOptions``
    /// (creation features this library does not implement but whose size QEMU computes).
    static var measureOnlyOptions: [String] { get }
    /// The sizes a new image needs.
    /// - Parameters:
    ///   - options: the checked `-o` values by name (as given; sizes normalized), with
    ///     `size` when known.
    ///   - source: the image to convert from, or nil to measure an empty image of `size`.
    /// - Throws: ``BlockError`` worded as qemu-img's messages.
    static func measure(options: [String: String], source: MeasureSource?) async throws -> MeasureResult
}

/// The image a measured conversion would copy, as a format's measure sees it.
public struct MeasureSource {
    /// One run of the image as `qemu-img map` sees it through the backing chain.
    public struct Run: Sendable {
        /// Length of the run in bytes.
        public var length: Int64
        /// Reads as zeros.
        public var zero: Bool
        /// Holds data (somewhere in the chain).
        public var data: Bool
        /// Allocated in some image of the chain.
        public var present: Bool

        /// Creates a run of `length` bytes with the given status.
        public init(length: Int64, zero: Bool, data: Bool, present: Bool) {
            self.length = length
            self.zero = zero
            self.data = data
            self.present = present
        }
    }

    /// The image (for what it carries besides data: ``PersistentBitmapStore``).
    public var node: any BlockDriver
    /// Its size as QEMU reports it (whole 512-byte sectors).
    public var length: Int64
    /// The run at an offset, at most the given length long.
    public var run: (_ offset: Int64, _ length: Int64) async throws -> Run

    /// Creates a source over `node`, `length` bytes long, whose runs `run` reports.
    public init(node: any BlockDriver, length: Int64, run: @escaping (_ offset: Int64, _ length: Int64) async throws -> Run) {
        self.node = node
        self.length = length
        self.run = run
    }
}

/// A format qemu-img can write onto an existing protocol node that cannot create images
/// itself (an NBD export), as QEMU's `bdrv_co_create_opts_simple` fallback lets it: the
/// node must exist and be large enough, its first sector is cleared, then the format
/// writes its image on it.
public protocol ExistingNodeCreatable: FormatDriver {
    /// What the format asks of the protocol node for an image of `size` bytes with `-o`
    /// `options` (QEMU passes the protocol the options the format does not consume): the
    /// size the node must have at least, and the preallocation mode asked for (nil: none).
    static func protocolRequest(size: Int64, options: [(String, String)]) -> (minimumSize: Int64, preallocation: String?)
    /// Writes the new image onto `file`, an open, writable protocol node that stays open.
    /// - Throws: ``BlockError`` worded as qemu-img's message for bad options, or I/O errors.
    static func create(on file: any BlockDriver, size: Int64, options: [(String, String)]) async throws
}

/// A format whose images `qemu-img amend` changes (its open nodes are ``Amendable``).
public protocol AmendableFormat: FormatDriver {
    /// The `-o` options `qemu-img amend` takes for this format, for `-o help`.
    static var amendOptions: [CreateOption] { get }
}

/// A format QMP's `blockdev-create` can create, on an open protocol node (QAPI's
/// `BlockdevCreateOptions<Format>`).
public protocol BlockdevCreatable: FormatDriver {
    /// Reads the format's `blockdev-create` members (all but `driver`), in its schema's
    /// order, and returns what the job will do. The caller reports members left over.
    /// - Throws: the reader's errors (missing or mistyped members).
    static func readBlockdevCreateOptions(_ members: any DriverOptionReader) throws -> BlockdevCreatePlan
}

/// A checked `blockdev-create` request of a format: the creation job opens `file`, runs
/// `check`, checks the node's permissions, refuses with `refusal` if set, then runs `create`
/// (QEMU's order).
public struct BlockdevCreatePlan: Sendable {
    /// The `file` member: a node name or a `BlockdevRef` object.
    public var file: QObject
    /// Why the job fails after its checks (a feature this implementation lacks), if it does.
    public var refusal: String?
    /// QEMU's checks of the options.
    public var check: @Sendable () throws -> Void
    /// Writes the new image onto the opened `file` node.
    public var create: @Sendable (any BlockDriver) async throws -> Void

    /// Creates a plan from its parts (see the properties).
    public init(file: QObject, refusal: String?, check: @escaping @Sendable () throws -> Void,
                create: @escaping @Sendable (any BlockDriver) async throws -> Void) {
        self.file = file
        self.refusal = refusal
        self.check = check
        self.create = create
    }
}

/// One `-o` option of `qemu-img create`.
public struct CreateOption: Sendable {
    /// How qemu-img parses the value.
    public enum ValueType: Sendable { case size, bool, number, string }
    /// The option's name as given to `-o` (`cluster_size`, `backing_file`, …).
    public var name: String
    /// How the value is parsed.
    public var type: ValueType
    /// The value qemu-img prints when the option is not given (nil: not printed).
    public var defaultValue: String?
    /// What `-o help` says of the option (QEMU's description).
    public var help: String?
    /// The option belongs to the host file below the format (QEMU's `file` protocol reads
    /// it, not the format): `-o help` lists it only when a target file name is given.
    public var protocolLevel: Bool

    /// Declares an option `name` of `type`, printed with `defaultValue` when not given,
    /// described by `help`; `protocolLevel` for an option of the host file below the format.
    public init(_ name: String, _ type: ValueType, default defaultValue: String? = nil, help: String? = nil,
                protocolLevel: Bool = false) {
        self.name = name
        self.type = type
        self.defaultValue = defaultValue
        self.help = help
        self.protocolLevel = protocolLevel
    }

    /// A boolean option value in the spellings QEMU accepts; nil for anything else.
    public static func parseBool(_ v: String) -> Bool? {
        switch v {
        case "on", "yes", "true", "y": return true
        case "off", "no", "false", "n": return false
        default: return nil
        }
    }
}

/// Options of one open that only one format understands (raw's `offset` and `size`), set
/// by that format's ``FormatDriver/readBlockdevOptions(_:into:)`` and read back by its open.
public protocol FormatOpenOptions: Sendable {}

/// Typed access to the members of a QAPI options object (`blockdev-add`, `blockdev-create`)
/// in the words of QEMU's visitor: a format reads its own members through it, the monitor
/// supplies it and reports the members nobody read.
public protocol DriverOptionReader: AnyObject {
    /// The member's full name in messages (`options.file`).
    func name(_ key: String) -> String
    /// The raw value of a member, if present (marks it read).
    func value(_ key: String) -> QObject?
    /// QEMU's error for a missing mandatory member.
    func missingError(_ key: String) -> any Error
    func optionalBool(_ key: String) throws -> Bool?
    func optionalInt(_ key: String) throws -> Int64?
    func optionalUInt(_ key: String, bits: Int) throws -> UInt64?
    func optionalString(_ key: String) throws -> String?
    /// A string member that must be one of `values`.
    func optionalEnum(_ key: String, _ values: [String]) throws -> String?
    /// A QAPI `size` member (uint64 on the wire; a negative number is taken as is, as
    /// QEMU's visitor takes it, to fail later).
    func optionalSize(_ key: String) throws -> Int64?
    /// A member of QAPI's `BlockdevDriver` enum (a format or protocol name QEMU knows).
    func optionalDriverName(_ key: String) throws -> String?
    /// A nested object member (a protocol's `server`), as a reader of its own whose members'
    /// names are prefixed with this one's (`server.path`); nil when absent.
    /// - Throws: QEMU's error for a member that is not an object.
    func optionalObjectMembers(_ key: String) throws -> (any DriverOptionReader)?
    /// Fails with QEMU's "Parameter 'NAME' is unexpected" for the first member not read.
    func done() throws
}

extension DriverOptionReader {
    /// A mandatory string member.
    /// - Throws: ``missingError(_:)`` when absent, the reader's error when not a string.
    public func requiredString(_ key: String) throws -> String {
        guard let s = try optionalString(key) else { throw missingError(key) }
        return s
    }

    /// A mandatory member that must be one of `values`.
    /// - Throws: ``missingError(_:)`` when absent, the reader's error for another value.
    public func requiredEnum(_ key: String, _ values: [String]) throws -> String {
        guard let s = try optionalEnum(key, values) else { throw missingError(key) }
        return s
    }

    /// A mandatory nested object member, as a reader of its own.
    /// - Throws: ``missingError(_:)`` when absent, the reader's error when not an object.
    public func requiredObjectMembers(_ key: String) throws -> any DriverOptionReader {
        guard let o = try optionalObjectMembers(key) else { throw missingError(key) }
        return o
    }
}

/// What `qemu-img measure` reports: the file size a new image needs.
public struct MeasureResult: Sendable, Equatable {
    /// Bytes needed for the image as converted (metadata for a fully allocated image, plus
    /// the data clusters the source really uses).
    public var required: Int64
    /// Bytes of the image fully allocated.
    public var fullyAllocated: Int64
    /// Bytes for persistent bitmaps, when qemu-img shows them (qcow2 v3 output of a source
    /// that can hold bitmaps).
    public var bitmaps: Int64?

    /// Creates a result from its sizes in bytes.
    public init(required: Int64, fullyAllocated: Int64, bitmaps: Int64? = nil) {
        self.required = required
        self.fullyAllocated = fullyAllocated
        self.bitmaps = bitmaps
    }
}
