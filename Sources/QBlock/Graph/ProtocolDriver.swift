import QBlockCore
/// A protocol driver as the registry sees it (QEMU's `BlockDriver` of a protocol): where an
/// image's bytes live — a host file, an NBD export. Each protocol implements it once, in its
/// own folder under `Drivers/Backends/`, on a type of its own (`FileProtocol`,
/// `NBDProtocol`), and is listed once in `ProtocolRegistry.builtIn`. `ImageOpener` picks one
/// by file name (``uriSchemes``), `blockdev-add`, `blockdev-reopen` and `blockdev-create` by
/// their `driver` member (``name``); nothing else chooses a protocol.
///
/// A protocol is not a format: formats (``FormatDriver``) sit on top of a protocol node.
/// What a protocol can do beyond this is a refining protocol (``ProtocolCreatable``) on the
/// driver type, or a capability protocol on its open nodes (``HostStorage``,
/// ``NetworkStorage``).
public protocol ProtocolDriver: Sendable {
    /// The QAPI driver name (`driver` in `blockdev-add`, a node's `drv`): "file", "nbd".
    static var name: String { get }

    /// The URI schemes (the part before `://`, compared without case) of the file names this
    /// driver opens: `nbd`, `nbd+unix`, …. Empty for the driver of plain host paths, which
    /// takes every file name no other driver claims.
    static var uriSchemes: [String] { get }

    /// Whether this driver takes `filename` although it has none of ``uriSchemes`` (QEMU's
    /// legacy pseudo-protocol syntaxes such as `nbd:unix:PATH`); false by default.
    static func claimsLegacyFilename(_ filename: String) -> Bool

    /// The `operation` of the "Could not open 'NAME': …" error `ImageOpener` makes of this
    /// driver's open errors: "open" for a host file, whose errors qemu-img words with the
    /// file name twice (see the tools' `openErrorMessage`), something else for the others.
    static var openOperation: String { get }

    /// Opens the node for `filename`, a name this driver claims, as `ImageOpener` does: in
    /// the mode and cache mode of `options`, without image locks (the opener takes them
    /// once the format is known, on a ``HostStorage`` node).
    /// - Throws: ``BlockError`` without the "Could not open" prefix, which the caller adds.
    static func open(filename: String, options: OpenOptions) async throws -> any BlockDriver

    /// The first bytes of `node`, opened by ``open(filename:options:)``, for probing its
    /// format: `count` bytes, or fewer when the node is shorter. The default reads them.
    /// - Throws: ``BlockError`` when they cannot be read.
    static func probeHead(of node: any BlockDriver, count: Int) async throws -> [UInt8]

    /// Reads this driver's own `blockdev-add` members (all but the common ones: `driver`,
    /// `node-name`, `read-only`, `cache`, …) in its schema's order, and returns how to open
    /// the node. The caller then reports the members left over, and only then opens.
    /// - Throws: the reader's errors for missing or mistyped members, ``BlockError`` for
    ///   values the schema accepts but the driver does not.
    static func readBlockdevOptions(_ members: any DriverOptionReader) throws -> ProtocolOpener

    /// The `blockdev-add` options object that opens `filename` (a name this driver claims)
    /// with this driver, `{"driver": NAME, …}`: how a backing file or a snapshot overlay
    /// named by its file name becomes a node.
    /// - Throws: ``BlockError`` when `filename` is not one this driver can open (a malformed URI).
    static func blockdevOptions(filename: String) throws -> QObject.Dict

    /// Reads this driver's members of a `blockdev-reopen` element without opening anything,
    /// as `blockdev-add` reads them, and returns what the element says; nil when nodes of
    /// this driver cannot be reopened here (the caller then reads none of the members and
    /// the reopen fails on the node). The default returns nil.
    /// - Throws: the reader's errors for missing or mistyped members.
    static func readReopenOptions(_ members: any DriverOptionReader) throws -> ProtocolReopenOptions?
}

extension ProtocolDriver {
    /// None by default.
    public static func claimsLegacyFilename(_ filename: String) -> Bool { false }

    /// Reads the first `count` bytes (fewer for a shorter node) with a plain read.
    public static func probeHead(of node: any BlockDriver, count: Int) async throws -> [UInt8] {
        try await node.read(at: 0, count: Int(min(Int64(count), node.length)))
    }

    /// Nodes of this driver cannot be reopened: nil.
    public static func readReopenOptions(_ members: any DriverOptionReader) throws -> ProtocolReopenOptions? { nil }
}

/// Opens a protocol node whose `blockdev-add` members were read by
/// ``ProtocolDriver/readBlockdevOptions(_:)``, in the mode of the command (`read-only`, and
/// the cache mode from `cache.direct` / `cache.no-flush`); it takes the image locks the
/// node needs on its own. Errors are ``BlockError``s worded as QEMU's replies.
public typealias ProtocolOpener = @Sendable (_ readOnly: Bool, _ cache: CacheMode) async throws -> any BlockDriver

/// What a `blockdev-reopen` element says about a protocol node (see
/// ``ProtocolDriver/readReopenOptions(_:)``).
public struct ProtocolReopenOptions: Sendable {
    /// The file name the element gives, which must be the node's (QEMU cannot change it).
    public var filename: String?
    /// The members given that this implementation cannot change in place, in order, with
    /// their values.
    public var fixedMembers: [(String, QObject)]

    /// Creates the options from their parts (see the properties).
    public init(filename: String?, fixedMembers: [(String, QObject)]) {
        self.filename = filename
        self.fixedMembers = fixedMembers
    }
}

/// A protocol QMP's `blockdev-create` can create storage for (QAPI's
/// `BlockdevCreateOptions<Protocol>`), and open as a new node to write an image onto (a
/// format's `file` given as an options object).
public protocol ProtocolCreatable: ProtocolDriver {
    /// Reads the driver's `blockdev-create` members (all but `driver`), in its schema's
    /// order, and returns what the job will do. The caller reports members left over, then
    /// runs ``ProtocolCreatePlan/check`` (its errors are the command's), then starts the job.
    /// - Throws: the reader's errors (missing or mistyped members).
    static func readBlockdevCreateOptions(_ members: any DriverOptionReader) throws -> ProtocolCreatePlan

    /// Reads a `BlockdevRef` object of this driver that `blockdev-create` opens as the node
    /// a format is written onto, and returns how to open it: read-write, taking write and
    /// resize and sharing only reading (QEMU's permissions of a creation job). The caller
    /// reports members left over before opening.
    /// - Throws: the reader's errors (missing or mistyped members).
    static func readCreateTarget(_ members: any DriverOptionReader) throws -> @Sendable () async throws -> any BlockDriver
}

/// A checked `blockdev-create` request of a protocol driver.
public struct ProtocolCreatePlan: Sendable {
    /// QEMU's checks of the options that fail the command itself (not the job).
    public var check: @Sendable () throws -> Void
    /// Creates the storage (the job's work).
    public var create: @Sendable () async throws -> Void

    /// Creates a plan from its parts (see the properties).
    public init(check: @escaping @Sendable () throws -> Void, create: @escaping @Sendable () async throws -> Void) {
        self.check = check
        self.create = create
    }
}

/// A driver that file names claim by a prefix (`blkdebug:`, `blkverify:`) and whose node
/// sits above other nodes the same file name names (QEMU's `bdrv_parse_filename` of a
/// filter such as blkdebug). The driver only splits the name and builds its node; the
/// registry above the drivers opens the children it names (recursively, so a child may be
/// prefixed too) and lists the driver in `ProtocolRegistry.prefixed`.
public protocol PrefixedFilterDriver: Sendable {
    /// The QAPI driver name: "blkdebug".
    static var name: String { get }
    /// The file name prefix this driver claims, colon included: "blkdebug:".
    static var filenamePrefix: String { get }
    /// Splits `filename` (which starts with ``filenamePrefix``) into the driver's own
    /// options and the file names of its children, in the order they are opened.
    /// - Throws: ``BlockError`` `.invalidArgument` with QEMU's message for a malformed name.
    static func parseFilename(_ filename: String) throws -> PrefixedFilename
    /// Opens the node for a parsed file name above its `children` (opened from
    /// ``PrefixedFilename/children``, in that order). The node owns the children.
    /// - Throws: ``BlockError`` (the caller closes the children then).
    static func open(_ parsed: PrefixedFilename, children: [any BlockDriver], options: OpenOptions) async throws -> any BlockDriver
}

/// A file name a ``PrefixedFilterDriver`` claims, split into its parts.
public struct PrefixedFilename: Sendable {
    /// The driver's own `blockdev-add` members the name gives (`config` for blkdebug).
    public var options: QObject.Dict
    /// The children the name names: the `blockdev-add` member each is (`image`, `raw`,
    /// `test`) and its file name.
    public var children: [(member: String, filename: String)]
    /// The members among ``children`` opened as whole images, their format probed
    /// (blkverify's `test`); the others are opened as protocol nodes only.
    public var imageMembers: Set<String>

    /// Creates a parsed name from its parts (see the properties).
    public init(options: QObject.Dict, children: [(member: String, filename: String)], imageMembers: Set<String> = []) {
        self.options = options
        self.children = children
        self.imageMembers = imageMembers
    }
}
