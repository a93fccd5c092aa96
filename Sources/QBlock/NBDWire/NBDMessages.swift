/// Encoding and decoding of NBD messages: plain values, no I/O. Both the server and the
/// client build on these; they are unit-tested and fuzzed without sockets.

/// Appends big-endian fields to a byte array.
public struct NBDWriter: Sendable {
    /// The bytes written so far.
    public private(set) var bytes: [UInt8] = []
    /// Creates an empty writer that reserves `capacity` bytes.
    public init(capacity: Int = 64) { bytes.reserveCapacity(capacity) }
    /// Appends one byte.
    public mutating func u8(_ v: UInt8) { bytes.append(v) }
    /// Appends a big-endian 16-bit value.
    public mutating func u16(_ v: UInt16) { bytes.append(UInt8(v >> 8)); bytes.append(UInt8(v & 0xff)) }
    /// Appends a big-endian 32-bit value.
    public mutating func u32(_ v: UInt32) { for s in stride(from: 24, through: 0, by: -8) { bytes.append(UInt8((v >> UInt32(s)) & 0xff)) } }
    /// Appends a big-endian 64-bit value.
    public mutating func u64(_ v: UInt64) { for s in stride(from: 56, through: 0, by: -8) { bytes.append(UInt8((v >> UInt64(s)) & 0xff)) } }
    /// Appends raw bytes.
    public mutating func append(_ b: [UInt8]) { bytes.append(contentsOf: b) }
    /// Appends a string's UTF-8 bytes, without length or terminator.
    public mutating func string(_ s: String) { bytes.append(contentsOf: Array(s.utf8)) }
    /// A u32 length followed by the string's UTF-8 bytes.
    public mutating func lengthPrefixed(_ s: String) {
        let b = Array(s.utf8)
        u32(UInt32(b.count))
        bytes.append(contentsOf: b)
    }
}

/// Reads big-endian fields from a byte array; every read checks the bounds.
public struct NBDReader: Sendable {
    /// The bytes being read.
    public let bytes: [UInt8]
    /// The offset of the next byte to read.
    public private(set) var position = 0
    /// Creates a reader at the start of `bytes`.
    public init(_ bytes: [UInt8]) { self.bytes = bytes }
    /// Bytes left after ``position``.
    public var remaining: Int { bytes.count - position }

    /// Thrown when a read goes past the end (or a length exceeds its limit).
    public struct Truncated: Error, Sendable {}

    /// Reads a big-endian 16-bit value.
    /// - Throws: ``Truncated`` if fewer than 2 bytes remain.
    public mutating func u16() throws -> UInt16 {
        guard remaining >= 2 else { throw Truncated() }
        defer { position += 2 }
        return UInt16(bytes[position]) << 8 | UInt16(bytes[position + 1])
    }
    /// Reads a big-endian 32-bit value.
    /// - Throws: ``Truncated`` if fewer than 4 bytes remain.
    public mutating func u32() throws -> UInt32 {
        guard remaining >= 4 else { throw Truncated() }
        var v: UInt32 = 0
        for i in 0..<4 { v = v << 8 | UInt32(bytes[position + i]) }
        position += 4
        return v
    }
    /// Reads a big-endian 64-bit value.
    /// - Throws: ``Truncated`` if fewer than 8 bytes remain.
    public mutating func u64() throws -> UInt64 {
        guard remaining >= 8 else { throw Truncated() }
        var v: UInt64 = 0
        for i in 0..<8 { v = v << 8 | UInt64(bytes[position + i]) }
        position += 8
        return v
    }
    /// Reads the next `n` bytes.
    /// - Throws: ``Truncated`` if `n` is negative or fewer than `n` bytes remain.
    public mutating func take(_ n: Int) throws -> [UInt8] {
        guard n >= 0, remaining >= n else { throw Truncated() }
        defer { position += n }
        return Array(bytes[position..<(position + n)])
    }
    /// A u32 length followed by that many bytes as UTF-8, at most `limit` long.
    public mutating func lengthPrefixedString(limit: Int = NBD.maxStringLength) throws -> String {
        let n = Int(try u32())
        guard n <= limit else { throw Truncated() }
        return String(decoding: try take(n), as: UTF8.self)
    }
}

/// A transmission-phase request header (28 bytes).
public struct NBDRequest: Sendable, Equatable {
    /// The header's size on the wire, in bytes.
    public static let size = 28
    /// The request's flags (FUA, NO_HOLE, DF, REQ_ONE, FAST_ZERO).
    public var flags: NBD.CommandFlags
    /// The raw command type (unknown values are kept so that the server can reject them).
    public var type: UInt16
    /// The client's tag for the request, echoed in every reply to it.
    public var cookie: UInt64
    /// Where the request starts in the export, in bytes.
    public var offset: UInt64
    /// How many bytes the request covers (a write's payload length).
    public var length: UInt32

    /// Creates a request header from its fields.
    public init(flags: NBD.CommandFlags, type: UInt16, cookie: UInt64, offset: UInt64, length: UInt32) {
        self.flags = flags
        self.type = type
        self.cookie = cookie
        self.offset = offset
        self.length = length
    }

    /// The command, if ``type`` is one the protocol defines.
    public var command: NBD.Command? { NBD.Command(rawValue: type) }

    /// Decodes a header; nil if the magic is wrong.
    public static func decode(_ b: [UInt8]) -> NBDRequest? {
        var r = NBDReader(b)
        guard let magic = try? r.u32(), magic == NBD.requestMagic,
              let flags = try? r.u16(), let type = try? r.u16(), let cookie = try? r.u64(),
              let offset = try? r.u64(), let length = try? r.u32() else { return nil }
        return NBDRequest(flags: NBD.CommandFlags(rawValue: flags), type: type, cookie: cookie, offset: offset, length: length)
    }

    /// Encodes the header (``size`` bytes, starting with the request magic).
    public func encode() -> [UInt8] {
        var w = NBDWriter(capacity: NBDRequest.size)
        w.u32(NBD.requestMagic)
        w.u16(flags.rawValue)
        w.u16(type)
        w.u64(cookie)
        w.u64(offset)
        w.u32(length)
        return w.bytes
    }
}

/// Encoders for server → client messages.
public enum NBDEncode {
    /// The greeting of the fixed newstyle handshake.
    public static func greeting(_ flags: NBD.HandshakeFlags) -> [UInt8] {
        var w = NBDWriter()
        w.u64(NBD.initMagic)
        w.u64(NBD.optionMagic)
        w.u16(flags.rawValue)
        return w.bytes
    }

    /// An option reply header plus payload.
    public static func optionReply(option: UInt32, type: NBD.OptionReply, payload: [UInt8] = []) -> [UInt8] {
        var w = NBDWriter(capacity: 20 + payload.count)
        w.u64(NBD.optionReplyMagic)
        w.u32(option)
        w.u32(type.rawValue)
        w.u32(UInt32(payload.count))
        w.append(payload)
        return w.bytes
    }

    /// An option error reply with a human-readable message (allowed by the protocol).
    public static func optionError(option: UInt32, type: NBD.OptionReply, message: String) -> [UInt8] {
        optionReply(option: option, type: type, payload: Array(message.utf8))
    }

    /// The reply to NBD_OPT_EXPORT_NAME: size, transmission flags, and 124 zero bytes
    /// unless the client asked for no zeroes.
    public static func exportNameReply(size: UInt64, flags: NBD.TransmissionFlags, noZeroes: Bool) -> [UInt8] {
        var w = NBDWriter()
        w.u64(size)
        w.u16(flags.rawValue)
        if !noZeroes { w.append([UInt8](repeating: 0, count: 124)) }
        return w.bytes
    }

    /// A simple reply header: the simple reply magic, `error` and `cookie` (16 bytes).
    public static func simpleReplyHeader(error: NBD.WireError, cookie: UInt64) -> [UInt8] {
        var w = NBDWriter(capacity: 16)
        w.u32(NBD.simpleReplyMagic)
        w.u32(error.rawValue)
        w.u64(cookie)
        return w.bytes
    }

    /// A structured reply chunk header (20 bytes); the payload follows.
    public static func chunkHeader(flags: UInt16, type: NBD.ReplyType, cookie: UInt64, length: UInt32) -> [UInt8] {
        var w = NBDWriter(capacity: 20)
        w.u32(NBD.structuredReplyMagic)
        w.u16(flags)
        w.u16(type.rawValue)
        w.u64(cookie)
        w.u32(length)
        return w.bytes
    }

    /// A complete NBD_REPLY_TYPE_ERROR chunk.
    public static func errorChunk(cookie: UInt64, error: NBD.WireError, message: String, done: Bool = true) -> [UInt8] {
        let m = Array(message.utf8.prefix(4096))
        var w = NBDWriter()
        w.append(chunkHeader(flags: done ? NBD.replyFlagDone : 0, type: .error, cookie: cookie, length: UInt32(6 + m.count)))
        w.u32(error.rawValue)
        w.u16(UInt16(m.count))
        w.append(m)
        return w.bytes
    }

    /// A complete NBD_REPLY_TYPE_OFFSET_HOLE chunk.
    public static func holeChunk(cookie: UInt64, offset: UInt64, length: UInt32, done: Bool) -> [UInt8] {
        var w = NBDWriter()
        w.append(chunkHeader(flags: done ? NBD.replyFlagDone : 0, type: .offsetHole, cookie: cookie, length: 12))
        w.u64(offset)
        w.u32(length)
        return w.bytes
    }

    /// A complete NBD_REPLY_TYPE_BLOCK_STATUS chunk: (length, flags) descriptors for one context.
    public static func blockStatusChunk(cookie: UInt64, contextID: UInt32, extents: [(UInt32, UInt32)], done: Bool) -> [UInt8] {
        var w = NBDWriter(capacity: 24 + extents.count * 8)
        w.append(chunkHeader(flags: done ? NBD.replyFlagDone : 0, type: .blockStatus, cookie: cookie,
                             length: UInt32(4 + extents.count * 8)))
        w.u32(contextID)
        for (l, f) in extents {
            w.u32(l)
            w.u32(f)
        }
        return w.bytes
    }

    /// NBD_REPLY_TYPE_NONE with the DONE flag.
    public static func doneChunk(cookie: UInt64) -> [UInt8] {
        chunkHeader(flags: NBD.replyFlagDone, type: .none, cookie: cookie, length: 0)
    }
}

/// The payload of NBD_OPT_INFO / NBD_OPT_GO.
public struct NBDInfoRequest: Sendable, Equatable {
    /// The export the client asks about.
    public var exportName: String
    /// The NBD_INFO_* items the client asks for (raw values; unknown ones are ignored).
    public var requests: [UInt16]

    /// Creates a request from its fields.
    public init(exportName: String, requests: [UInt16]) { self.exportName = exportName; self.requests = requests }

    /// Decodes a payload; nil if it is malformed or has bytes left over.
    public static func decode(_ payload: [UInt8]) -> NBDInfoRequest? {
        var r = NBDReader(payload)
        guard let name = try? r.lengthPrefixedString(), let n = try? r.u16() else { return nil }
        var reqs: [UInt16] = []
        for _ in 0..<n {
            guard let v = try? r.u16() else { return nil }
            reqs.append(v)
        }
        guard r.remaining == 0 else { return nil }
        return NBDInfoRequest(exportName: name, requests: reqs)
    }

    /// Encodes the payload as a client sends it.
    public func encode() -> [UInt8] {
        var w = NBDWriter()
        w.lengthPrefixed(exportName)
        w.u16(UInt16(requests.count))
        for q in requests { w.u16(q) }
        return w.bytes
    }
}

/// The payload of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT.
public struct NBDMetaContextRequest: Sendable, Equatable {
    /// The export the contexts are for.
    public var exportName: String
    /// The context names or queries (`base:allocation`, `qemu:dirty-bitmap:`, …); empty lists all.
    public var queries: [String]

    /// Creates a request from its fields.
    public init(exportName: String, queries: [String]) { self.exportName = exportName; self.queries = queries }

    /// Decodes a payload; nil if it is malformed or has bytes left over.
    public static func decode(_ payload: [UInt8]) -> NBDMetaContextRequest? {
        var r = NBDReader(payload)
        guard let name = try? r.lengthPrefixedString(), let n = try? r.u32() else { return nil }
        var qs: [String] = []
        for _ in 0..<n {
            guard let q = try? r.lengthPrefixedString() else { return nil }
            qs.append(q)
        }
        guard r.remaining == 0 else { return nil }
        return NBDMetaContextRequest(exportName: name, queries: qs)
    }

    /// Encodes the payload as a client sends it.
    public func encode() -> [UInt8] {
        var w = NBDWriter()
        w.lengthPrefixed(exportName)
        w.u32(UInt32(queries.count))
        for q in queries { w.lengthPrefixed(q) }
        return w.bytes
    }
}
