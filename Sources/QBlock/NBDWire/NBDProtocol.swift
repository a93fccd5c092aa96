/// Constants of the NBD protocol (the NBD project's `doc/proto.md`), shared by the server
/// and the client. Values are written and read big-endian, one field at a time.
public enum NBD {
    /// The server greeting's first field, "NBDMAGIC".
    public static let initMagic: UInt64 = 0x4e42_444d_4147_4943          // "NBDMAGIC"
    /// The newstyle greeting's second field and the start of every option request, "IHAVEOPT".
    public static let optionMagic: UInt64 = 0x4948_4156_454f_5054        // "IHAVEOPT"
    /// The start of every option reply.
    public static let optionReplyMagic: UInt64 = 0x0003_e889_0455_65a9
    /// The oldstyle greeting's second field (the client recognizes it to refuse the server).
    public static let oldstyleMagic: UInt64 = 0x0000_4202_8186_1253
    /// The start of every transmission request.
    public static let requestMagic: UInt32 = 0x2560_9513
    /// The start of a simple reply.
    public static let simpleReplyMagic: UInt32 = 0x6744_6698
    /// The start of a structured reply chunk.
    public static let structuredReplyMagic: UInt32 = 0x668e_33ef
    /// The IANA-assigned TCP port, used when an `nbd://` URI names none.
    public static let defaultPort: UInt16 = 10809
    /// Largest option payload a server accepts (qemu-nbd uses NBD_MAX_BUFFER_SIZE-ish limits).
    public static let maxOptionLength: UInt32 = 64 * 1024
    /// Largest read/write payload (32 MiB, qemu-nbd's NBD_MAX_BUFFER_SIZE).
    public static let maxPayload: UInt32 = 32 << 20
    /// Longest export name and string (the protocol's 4096-byte limit).
    public static let maxStringLength = 4096

    /// Handshake flags (server, u16).
    public struct HandshakeFlags: OptionSet, Sendable {
        public let rawValue: UInt16
        public init(rawValue: UInt16) { self.rawValue = rawValue }
        public static let fixedNewstyle = HandshakeFlags(rawValue: 1 << 0)
        public static let noZeroes = HandshakeFlags(rawValue: 1 << 1)
    }

    /// Client flags (u32).
    public struct ClientFlags: OptionSet, Sendable {
        public let rawValue: UInt32
        public init(rawValue: UInt32) { self.rawValue = rawValue }
        public static let fixedNewstyle = ClientFlags(rawValue: 1 << 0)
        public static let noZeroes = ClientFlags(rawValue: 1 << 1)
    }

    /// Transmission flags (u16) of an export.
    public struct TransmissionFlags: OptionSet, Sendable, Hashable {
        public let rawValue: UInt16
        public init(rawValue: UInt16) { self.rawValue = rawValue }
        public static let hasFlags = TransmissionFlags(rawValue: 1 << 0)
        public static let readOnly = TransmissionFlags(rawValue: 1 << 1)
        public static let sendFlush = TransmissionFlags(rawValue: 1 << 2)
        public static let sendFUA = TransmissionFlags(rawValue: 1 << 3)
        public static let rotational = TransmissionFlags(rawValue: 1 << 4)
        public static let sendTrim = TransmissionFlags(rawValue: 1 << 5)
        public static let sendWriteZeroes = TransmissionFlags(rawValue: 1 << 6)
        public static let sendDF = TransmissionFlags(rawValue: 1 << 7)
        public static let canMultiConn = TransmissionFlags(rawValue: 1 << 8)
        public static let sendResize = TransmissionFlags(rawValue: 1 << 9)
        public static let sendCache = TransmissionFlags(rawValue: 1 << 10)
        public static let sendFastZero = TransmissionFlags(rawValue: 1 << 11)
    }

    /// Handshake options (u32).
    public enum Option: UInt32, Sendable {
        case exportName = 1
        case abort = 2
        case list = 3
        case peekExport = 4
        case startTLS = 5
        case info = 6
        case go = 7
        case structuredReply = 8
        case listMetaContext = 9
        case setMetaContext = 10
        case extendedHeaders = 11
    }

    /// Option reply types (u32); errors have bit 31 set.
    public enum OptionReply: UInt32, Sendable {
        case ack = 1
        case server = 2
        case info = 3
        case metaContext = 4
        case errUnsupported = 0x8000_0001
        case errPolicy = 0x8000_0002
        case errInvalid = 0x8000_0003
        case errPlatform = 0x8000_0004
        case errTLSRequired = 0x8000_0005
        case errUnknown = 0x8000_0006
        case errShutdown = 0x8000_0007
        case errBlockSizeRequired = 0x8000_0008
        case errTooBig = 0x8000_0009
    }

    /// Information types in NBD_REP_INFO (u16).
    public enum Info: UInt16, Sendable {
        case export = 0
        case name = 1
        case description = 2
        case blockSize = 3
    }

    /// Transmission commands (u16).
    public enum Command: UInt16, Sendable {
        case read = 0
        case write = 1
        case disconnect = 2
        case flush = 3
        case trim = 4
        case cache = 5
        case writeZeroes = 6
        case blockStatus = 7
        case resize = 8
    }

    /// Command flags (u16).
    public struct CommandFlags: OptionSet, Sendable, Hashable {
        public let rawValue: UInt16
        public init(rawValue: UInt16) { self.rawValue = rawValue }
        /// Force unit access: the write is durable before the reply.
        public static let fua = CommandFlags(rawValue: 1 << 0)
        /// Write-zeroes must not deallocate.
        public static let noHole = CommandFlags(rawValue: 1 << 1)
        /// Don't fragment: a read's data comes in one chunk.
        public static let dontFragment = CommandFlags(rawValue: 1 << 2)
        /// Block status: one extent is enough.
        public static let reqOne = CommandFlags(rawValue: 1 << 3)
        /// Write-zeroes: fail rather than write zeros slowly.
        public static let fastZero = CommandFlags(rawValue: 1 << 4)
        /// Every flag the protocol defines for requests.
        public static let known: CommandFlags = [.fua, .noHole, .dontFragment, .reqOne, .fastZero]
    }

    /// Structured reply chunk types (u16).
    public enum ReplyType: UInt16, Sendable {
        case none = 0
        case offsetData = 1
        case offsetHole = 2
        case blockStatus = 5
        case error = 0x8001
        case errorOffset = 0x8002
    }

    /// Structured reply flags (u16).
    public static let replyFlagDone: UInt16 = 1

    /// Errors on the wire (u32): the protocol's subset of errno values.
    public enum WireError: UInt32, Sendable {
        case ok = 0
        case perm = 1
        case io = 5
        case nomem = 12
        case inval = 22
        case nospc = 28
        case overflow = 75
        case notsup = 95
        case shutdown = 108

        /// Maps a host errno to the protocol's value (EACCES and EROFS become EPERM, EDQUOT
        /// ENOSPC, anything else unlisted EIO).
        public init(errno: Int32) {
            switch errno {
            case 0: self = .ok
            case 1, 13, 30: self = .perm      // EPERM, EACCES, EROFS
            case 5: self = .io
            case 12: self = .nomem
            case 22: self = .inval
            case 28, 122: self = .nospc       // ENOSPC, EDQUOT
            case 75: self = .overflow
            case 95: self = .notsup
            case 108: self = .shutdown
            default: self = .io
            }
        }

        /// The host errno for a value received from a peer.
        public var errno: Int32 { Int32(rawValue) }
    }

    /// base:allocation status flags.
    public static let stateHole: UInt32 = 1 << 0
    /// `base:allocation`: the area reads as zeros.
    public static let stateZero: UInt32 = 1 << 1
    /// `qemu:dirty-bitmap:` status flag: the area is dirty.
    public static let stateDirty: UInt32 = 1 << 0

    /// The standard allocation context (holes and zeros).
    public static let contextBaseAllocation = "base:allocation"
    /// QEMU's context reporting at which depth of the backing chain an area is allocated.
    public static let contextAllocationDepth = "qemu:allocation-depth"
    /// The prefix of QEMU's dirty-bitmap contexts; the bitmap name follows.
    public static let contextDirtyBitmapPrefix = "qemu:dirty-bitmap:"
}
