/// Client-side encoding and decoding of NBD messages (`doc/proto.md`): client → server
/// handshake messages, and decoders for the server's option replies, simple replies and
/// structured reply chunks. Plain values, no I/O; the client node and its unit tests use them.

/// Why a message from the server could not be decoded.
public struct NBDProtocolViolation: Error, Sendable, Equatable, CustomStringConvertible {
    /// What was wrong, for messages and logs.
    public var reason: String
    /// Creates a violation described by `reason`.
    public init(_ reason: String) { self.reason = reason }
    public var description: String { reason }
}

extension NBDEncode {
    /// The client's flags, sent once after the server's greeting.
    public static func clientFlags(_ flags: NBD.ClientFlags) -> [UInt8] {
        var w = NBDWriter(capacity: 4)
        w.u32(flags.rawValue)
        return w.bytes
    }

    /// An option request: `IHAVEOPT`, the option, the payload length and the payload.
    public static func optionRequest(_ option: NBD.Option, payload: [UInt8] = []) -> [UInt8] {
        var w = NBDWriter(capacity: 16 + payload.count)
        w.u64(NBD.optionMagic)
        w.u32(option.rawValue)
        w.u32(UInt32(payload.count))
        w.append(payload)
        return w.bytes
    }
}

/// The 20-byte header of an option reply; `length` payload bytes follow.
public struct NBDOptionReplyHeader: Sendable, Equatable {
    /// The header's size on the wire, in bytes.
    public static let size = 20
    /// The option this reply answers (the value the client sent).
    public var option: UInt32
    /// The raw reply type (unknown values kept; errors have bit 31 set).
    public var type: UInt32
    /// How many payload bytes follow the header.
    public var length: UInt32

    /// The reply type, if it is one the protocol defines.
    public var replyType: NBD.OptionReply? { NBD.OptionReply(rawValue: type) }
    /// Whether the reply is an error (NBD_REP_ERR_*: bit 31 set).
    public var isError: Bool { type & 0x8000_0000 != 0 }

    /// Decodes a header of exactly ``size`` bytes.
    /// - Throws: ``NBDProtocolViolation`` if it is truncated or its magic is not `optionReplyMagic`.
    public static func decode(_ b: [UInt8]) throws(NBDProtocolViolation) -> NBDOptionReplyHeader {
        var r = NBDReader(b)
        guard b.count == size, let magic = try? r.u64(), let option = try? r.u32(), let type = try? r.u32(),
              let length = try? r.u32() else { throw NBDProtocolViolation("truncated option reply") }
        guard magic == NBD.optionReplyMagic else {
            throw NBDProtocolViolation("unexpected option reply magic 0x\(String(magic, radix: 16))")
        }
        return NBDOptionReplyHeader(option: option, type: type, length: length)
    }
}

/// The header of a transmission-phase reply: a simple reply (16 bytes) or a structured
/// reply chunk (20 bytes). Both start with the same 16 bytes after the magic is told apart.
public enum NBDReplyHeader: Sendable, Equatable {
    /// A simple reply: its error (0 for success) and the request's cookie; a read's data follows.
    case simple(error: UInt32, cookie: UInt64)
    /// A structured reply chunk: flags (``NBD/replyFlagDone``), chunk type, cookie and payload length.
    case chunk(flags: UInt16, type: UInt16, cookie: UInt64, length: UInt32)

    /// The size of a simple reply header, in bytes.
    public static let simpleSize = 16
    /// The size of a structured reply chunk header, in bytes.
    public static let chunkSize = 20

    /// The cookie of the request this reply answers.
    public var cookie: UInt64 {
        switch self {
        case .simple(_, let c), .chunk(_, _, let c, _): return c
        }
    }

    /// How many bytes the header has in total, judged from its first 16 bytes (the magic).
    public static func totalSize(first16 b: [UInt8]) throws(NBDProtocolViolation) -> Int {
        var r = NBDReader(b)
        guard let magic = try? r.u32() else { throw NBDProtocolViolation("truncated reply") }
        switch magic {
        case NBD.simpleReplyMagic: return simpleSize
        case NBD.structuredReplyMagic: return chunkSize
        default: throw NBDProtocolViolation("unexpected reply magic 0x\(String(magic, radix: 16))")
        }
    }

    /// Decodes a whole header (16 or 20 bytes, per ``totalSize(first16:)``).
    public static func decode(_ b: [UInt8]) throws(NBDProtocolViolation) -> NBDReplyHeader {
        var r = NBDReader(b)
        guard let magic = try? r.u32() else { throw NBDProtocolViolation("truncated reply") }
        switch magic {
        case NBD.simpleReplyMagic:
            guard b.count == simpleSize, let e = try? r.u32(), let c = try? r.u64() else {
                throw NBDProtocolViolation("truncated simple reply")
            }
            return .simple(error: e, cookie: c)
        case NBD.structuredReplyMagic:
            guard b.count == chunkSize, let f = try? r.u16(), let t = try? r.u16(), let c = try? r.u64(),
                  let l = try? r.u32() else { throw NBDProtocolViolation("truncated structured reply") }
            return .chunk(flags: f, type: t, cookie: c, length: l)
        default:
            throw NBDProtocolViolation("unexpected reply magic 0x\(String(magic, radix: 16))")
        }
    }
}

/// Decoders of structured reply chunk payloads.
public enum NBDChunk {
    /// An error chunk: NBD_REPLY_TYPE_ERROR, NBD_REPLY_TYPE_ERROR_OFFSET, or any unknown
    /// type with the error bit (15) set.
    public struct ErrorPayload: Sendable, Equatable {
        /// The error, as an NBD error value (``NBD/WireError``'s raw values, but unknown ones kept).
        public var error: UInt32
        /// The server's human-readable message (may be empty).
        public var message: String
        /// Where the error happened, for NBD_REPLY_TYPE_ERROR_OFFSET.
        public var offset: UInt64?
        /// Creates an error payload from its fields.
        public init(error: UInt32, message: String, offset: UInt64?) {
            self.error = error; self.message = message; self.offset = offset
        }
    }

    /// Whether a chunk type is an error type (bit 15 set), known or not.
    public static func isErrorType(_ type: UInt16) -> Bool { type & 0x8000 != 0 }

    /// Decodes the payload of an error chunk of type `type`.
    /// - Throws: ``NBDProtocolViolation`` if it is malformed or carries error value 0.
    public static func decodeError(type: UInt16, _ p: [UInt8]) throws(NBDProtocolViolation) -> ErrorPayload {
        var r = NBDReader(p)
        guard let error = try? r.u32(), let n = try? r.u16(), let msg = try? r.take(Int(n)) else {
            throw NBDProtocolViolation("malformed error chunk")
        }
        guard error != 0 else { throw NBDProtocolViolation("error chunk with error value 0") }
        var offset: UInt64?
        if type == NBD.ReplyType.errorOffset.rawValue {
            guard let o = try? r.u64(), r.remaining == 0 else { throw NBDProtocolViolation("malformed error offset chunk") }
            offset = o
        } else if type == NBD.ReplyType.error.rawValue, r.remaining != 0 {
            throw NBDProtocolViolation("malformed error chunk")
        }
        return ErrorPayload(error: error, message: String(decoding: msg, as: UTF8.self), offset: offset)
    }

    /// NBD_REPLY_TYPE_OFFSET_HOLE: (offset, length).
    public static func decodeHole(_ p: [UInt8]) throws(NBDProtocolViolation) -> (offset: UInt64, length: UInt32) {
        var r = NBDReader(p)
        guard p.count == 12, let o = try? r.u64(), let l = try? r.u32() else {
            throw NBDProtocolViolation("malformed hole chunk")
        }
        guard l > 0 else { throw NBDProtocolViolation("empty hole chunk") }
        return (o, l)
    }

    /// NBD_REPLY_TYPE_BLOCK_STATUS: a context id and (length, flags) descriptors.
    public static func decodeBlockStatus(_ p: [UInt8]) throws(NBDProtocolViolation) -> (contextID: UInt32, extents: [(length: UInt32, flags: UInt32)]) {
        var r = NBDReader(p)
        guard p.count >= 12, (p.count - 4) % 8 == 0, let id = try? r.u32() else {
            throw NBDProtocolViolation("malformed block status chunk")
        }
        var extents: [(length: UInt32, flags: UInt32)] = []
        while r.remaining > 0 {
            guard let l = try? r.u32(), let f = try? r.u32() else { throw NBDProtocolViolation("malformed block status chunk") }
            extents.append((l, f))
        }
        return (id, extents)
    }

    /// Checks that `[offset, offset + count)` lies within the request `[reqOffset, reqOffset + reqLength)`
    /// and returns where it starts in the request's buffer.
    public static func position(offset: UInt64, count: UInt64, reqOffset: UInt64, reqLength: UInt32) throws(NBDProtocolViolation) -> Int {
        guard offset >= reqOffset, count <= UInt64(reqLength), offset - reqOffset <= UInt64(reqLength) - count else {
            throw NBDProtocolViolation("server sent a chunk outside the requested range")
        }
        return Int(offset - reqOffset)
    }
}
