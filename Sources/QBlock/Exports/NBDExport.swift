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

    public struct Options: Sendable {
        /// Advertise the export read-only and refuse writes with EPERM.
        public var readOnly: Bool
        public var discard: DiscardMode
        public var detectZeroes: DetectZeroes
        /// Offer the `qemu:allocation-depth` metadata context (qemu-nbd `-A`).
        public var allocationDepth: Bool
        /// Flush after every write (qemu-nbd `--cache=writethrough` / `directsync`).
        public var writethrough: Bool
        /// Advertise NBD_FLAG_CAN_MULTI_CONN; `nil`: only for read-only exports. Safe
        /// whenever it is set, because every connection shares one node (a flush on one
        /// connection flushes what all of them wrote).
        public var multiConnection: Bool?

        public init(readOnly: Bool = false, discard: DiscardMode = .ignore, detectZeroes: DetectZeroes = .off,
                    allocationDepth: Bool = false, writethrough: Bool = false, multiConnection: Bool? = nil) {
            self.readOnly = readOnly
            self.discard = discard
            self.detectZeroes = detectZeroes
            self.allocationDepth = allocationDepth
            self.writethrough = writethrough
            self.multiConnection = multiConnection
        }
    }

    public let name: String
    public let description: String?
    public let node: any BlockDriver
    public let options: Options

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
        self.name = name
        self.description = description
        self.node = node
        self.options = options
    }

    /// The export as the handshake sees it: plain values.
    public var info: NBDExportDescriptor {
        NBDExportDescriptor(name: name, description: description, size: UInt64(max(0, node.length)),
                      flags: transmissionFlags, allocationDepth: options.allocationDepth)
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
    public var name: String
    public var description: String?
    public var size: UInt64
    public var flags: NBD.TransmissionFlags
    /// Whether `qemu:allocation-depth` is offered.
    public var allocationDepth: Bool

    public init(name: String, description: String? = nil, size: UInt64, flags: NBD.TransmissionFlags, allocationDepth: Bool = false) {
        self.name = name
        self.description = description
        self.size = size
        self.flags = flags
        self.allocationDepth = allocationDepth
    }
}
