import QBlockBitmaps
import QBlockCore
import QBlockDrivers
import QBlockGraph
import QBlockNBDWire
/// One disk offered by an ``NBDServer``: a node of the graph, a name, and the choices
/// qemu-nbd's command line makes (read-only, discard, detect-zeroes, allocation depth).
///
/// The export uses its node like any other user of a disk; it never closes it (whoever
/// opened the node closes it after the server is shut down).
public final class NBDExport: Sendable {
    /// What a client's TRIM does (qemu's `discard=`).
    public enum DiscardMode: String, Sendable, CaseIterable {
        /// TRIM succeeds without touching the image; write-zeroes never unmaps.
        case ignore
        /// TRIM discards; write-zeroes may unmap unless the client says NO_HOLE.
        case unmap
    }

    /// Whether writes of all-zero buffers become write-zeroes requests (qemu's `detect-zeroes=`).
    public enum DetectZeroes: String, Sendable, CaseIterable {
        case off, on, unmap
    }

    /// The choices made when the export is created (qemu-nbd's command-line options).
    public struct Options: Sendable {
        /// Advertise the export read-only and refuse writes with EPERM.
        public var readOnly: Bool
        /// What a client's TRIM does (`--discard`); default ``DiscardMode/ignore``.
        public var discard: DiscardMode
        /// Whether all-zero writes become write-zeroes (`--detect-zeroes`); default ``DetectZeroes/off``.
        public var detectZeroes: DetectZeroes
        /// Offer the `qemu:allocation-depth` metadata context (qemu-nbd `-A`).
        public var allocationDepth: Bool
        /// Flush after every write (qemu-nbd `--cache=writethrough` / `directsync`).
        public var writethrough: Bool
        /// Advertise NBD_FLAG_CAN_MULTI_CONN; `nil`: only for read-only exports. Safe
        /// whenever it is set, because every connection shares one node (a flush on one
        /// connection flushes what all of them wrote).
        public var multiConnection: Bool?
        /// Dirty bitmaps offered as `qemu:dirty-bitmap:NAME` metadata contexts (qemu-nbd
        /// `-B NAME`): a block status reply flags dirty areas 1 (NBD_STATE_DIRTY), clean 0.
        /// They are marked busy while the export exists.
        public var bitmaps: [DirtyBitmap]

        /// Creates options; every parameter is the property of the same name. The defaults are
        /// qemu-nbd's: writable, TRIM ignored, no zero detection, write-back, no metadata beyond
        /// `base:allocation`.
        public init(readOnly: Bool = false, discard: DiscardMode = .ignore, detectZeroes: DetectZeroes = .off,
                    allocationDepth: Bool = false, writethrough: Bool = false, multiConnection: Bool? = nil,
                    bitmaps: [DirtyBitmap] = []) {
            self.bitmaps = bitmaps
            self.readOnly = readOnly
            self.discard = discard
            self.detectZeroes = detectZeroes
            self.allocationDepth = allocationDepth
            self.writethrough = writethrough
            self.multiConnection = multiConnection
        }
    }

    /// The name clients ask for in NBD_OPT_GO ("" is the default export).
    public let name: String
    /// A human-readable description sent with NBD_INFO_DESCRIPTION, if any (qemu-nbd `-D`).
    public let description: String?
    /// The disk served; the export never closes it.
    public let node: any BlockDriver
    /// The options the export was created with (see ``writePolicy`` for the ones in force).
    public let options: Options
    /// The discard and detect-zeroes choices in force, initially `options`' ones; a QMP
    /// `blockdev-reopen` of the exported node changes them while clients are connected
    /// (in QEMU they are flags of the node).
    public let writePolicy: WritePolicy

    /// ``Options/discard`` and ``Options/detectZeroes``, changeable while the export runs.
    // @unchecked: `_discard` and `_detectZeroes` are only touched with `lock` held.
    public final class WritePolicy: @unchecked Sendable {
        // @unchecked: the values are only touched with `lock` held.
        private let lock = PosixMutex()
        private var _discard: DiscardMode
        private var _detectZeroes: DetectZeroes
        init(discard: DiscardMode, detectZeroes: DetectZeroes) {
            _discard = discard
            _detectZeroes = detectZeroes
        }
        /// What a client's TRIM does now.
        public var discard: DiscardMode { lock.withLock { _discard } }
        /// Whether all-zero writes become write-zeroes now.
        public var detectZeroes: DetectZeroes { lock.withLock { _detectZeroes } }
        /// Both at once.
        public var current: (discard: DiscardMode, detectZeroes: DetectZeroes) { lock.withLock { (_discard, _detectZeroes) } }
        /// Changes both choices at once; requests that start afterwards use the new ones.
        public func set(discard: DiscardMode, detectZeroes: DetectZeroes) {
            lock.withLock { _discard = discard; _detectZeroes = detectZeroes }
        }
    }

    /// Creates an export of `node`.
    /// - Throws: ``BlockError`` `.invalidArgument` if the name or description is longer than
    ///   the protocol's 4096 bytes, or `.readOnly` if a read-only node is exported writable.
    public init(name: String = "", description: String? = nil, node: any BlockDriver, options: Options = Options()) throws {
        guard name.utf8.count <= NBD.maxStringLength else {
            throw BlockError(.invalidArgument, "export name '\(name.prefix(64))...' too long", operation: "add export")
        }
        if let description, description.utf8.count > NBD.maxStringLength {
            throw BlockError(.invalidArgument, "description '\(description.prefix(64))...' too long", operation: "add export")
        }
        if !options.readOnly && node.isReadOnly {
            throw BlockError(.readOnly, "Cannot export read-only node '\(node.filename)' writable", path: node.filename,
                             operation: "add export")
        }
        for b in options.bitmaps {
            if let e = b.useError(allowReadOnly: true) { throw e }
            if options.readOnly && !node.isReadOnly && b.isEnabled {
                throw BlockError(.invalidArgument, "Enabled bitmap '\(b.name)' incompatible with readonly export",
                                 operation: "add export")
            }
        }
        if Set(options.bitmaps.map(\.name)).count != options.bitmaps.count {
            throw BlockError(.invalidArgument, "Duplicate bitmap names in export", operation: "add export")
        }
        self.name = name
        self.writePolicy = WritePolicy(discard: options.discard, detectZeroes: options.detectZeroes)
        self.description = description
        self.node = node
        self.options = options
        for b in options.bitmaps { b.isBusy = true }
    }

    deinit {
        for b in options.bitmaps { b.isBusy = false }
    }

    /// The export as the handshake sees it: plain values.
    public var info: NBDExportDescriptor {
        var d = NBDExportDescriptor(name: name, description: description, size: UInt64(max(0, node.length)),
                      flags: transmissionFlags, allocationDepth: options.allocationDepth,
                      bitmapNames: options.bitmaps.map(\.name))
        d.requestAlignment = UInt32(clamping: max(1, node.requestAlignment))
        return d
    }

    /// The transmission flags qemu-nbd advertises for this export (SEND_DF is added per
    /// client when it negotiates structured replies).
    public var transmissionFlags: NBD.TransmissionFlags {
        var f: NBD.TransmissionFlags = [.hasFlags, .sendFlush, .sendFUA, .sendCache]
        if options.readOnly {
            f.insert(.readOnly)
        } else {
            f.formUnion([.sendTrim, .sendWriteZeroes, .sendFastZero])
        }
        if options.multiConnection ?? options.readOnly { f.insert(.canMultiConn) }
        return f
    }
}

/// What the handshake needs to know about an export: its name, description, size and
/// transmission flags. A value, so the handshake state machine stays free of I/O.
public struct NBDExportDescriptor: Sendable, Equatable {
    /// The export name.
    public var name: String
    public var description: String?
    /// The export's size in bytes, as NBD_INFO_EXPORT reports it.
    public var size: UInt64
    /// The transmission flags advertised (read-only, flush, FUA, trim, …).
    public var flags: NBD.TransmissionFlags
    /// Whether `qemu:allocation-depth` is offered.
    public var allocationDepth: Bool
    /// Names of the bitmaps offered as `qemu:dirty-bitmap:NAME`, in context id order.
    public var bitmapNames: [String]
    /// The node's request alignment: the minimum block size advertised to a client that
    /// asks for block sizes (or uses NBD_OPT_INFO), as qemu-nbd does; others are told 1.
    public var requestAlignment: UInt32 = 1

    public init(name: String, description: String? = nil, size: UInt64, flags: NBD.TransmissionFlags, allocationDepth: Bool = false,
                bitmapNames: [String] = []) {
        self.bitmapNames = bitmapNames
        self.name = name
        self.description = description
        self.size = size
        self.flags = flags
        self.allocationDepth = allocationDepth
    }
}
