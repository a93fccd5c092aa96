/// Encoding and decoding of NBD messages: plain values, no I/O. Both the server and the
/// client build on these; they are unit-tested and fuzzed without sockets.

/// Appends big-endian fields to a byte array.
public struct NBDWriter: Sendable {
    public private(set) var bytes: [UInt8] = []
    public init(capacity: Int = 64) { bytes.reserveCapacity(capacity) }
    public mutating func u8(_ v: UInt8) { bytes.append(v) }
    public mutating func u16(_ v: UInt16) { bytes.append(UInt8(v >> 8)); bytes.append(UInt8(v & 0xff)) }
    public mutating func u32(_ v: UInt32) { for s in stride(from: 24, through: 0, by: -8) { bytes.append(UInt8((v >> UInt32(s)) & 0xff)) } }
    public mutating func u64(_ v: UInt64) { for s in stride(from: 56, through: 0, by: -8) { bytes.append(UInt8((v >> UInt64(s)) & 0xff)) } }
    public mutating func append(_ b: [UInt8]) { bytes.append(contentsOf: b) }
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
    public let bytes: [UInt8]
    public private(set) var position = 0
    public init(_ bytes: [UInt8]) { self.bytes = bytes }
    public var remaining: Int { bytes.count - position }

    public struct Truncated: Error, Sendable {}

    public mutating func u16() throws -> UInt16 {
        guard remaining >= 2 else { throw Truncated() }
        defer { position += 2 }
        return UInt16(bytes[position]) << 8 | UInt16(bytes[position + 1])
    }
    public mutating func u32() throws -> UInt32 {
        guard remaining >= 4 else { throw Truncated() }
        var v: UInt32 = 0
        for i in 0..<4 { v = v << 8 | UInt32(bytes[position + i]) }
        position += 4
        return v
    }
    public mutating func u64() throws -> UInt64 {
        guard remaining >= 8 else { throw Truncated() }
        var v: UInt64 = 0
        for i in 0..<8 { v = v << 8 | UInt64(bytes[position + i]) }
        position += 8
        return v
    }
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
    public static let size = 28
    public var flags: NBD.CommandFlags
    /// The raw command type (unknown values are kept so that the server can reject them).
    public var type: UInt16
    public var cookie: UInt64
    public var offset: UInt64
    public var length: UInt32

    public init(flags: NBD.CommandFlags, type: UInt16, cookie: UInt64, offset: UInt64, length: UInt32) {
        self.flags = flags
        self.type = type
        self.cookie = cookie
        self.offset = offset
        self.length = length
    }

    public var command: NBD.Command? { NBD.Command(rawValue: type) }

    /// Decodes a header; nil if the magic is wrong.
    public static func decode(_ b: [UInt8]) -> NBDRequest? {
        var r = NBDReader(b)
        guard let magic = try? r.u32(), magic == NBD.requestMagic,
              let flags = try? r.u16(), let type = try? r.u16(), let cookie = try? r.u64(),
              let offset = try? r.u64(), let length = try? r.u32() else { return nil }
        return NBDRequest(flags: NBD.CommandFlags(rawValue: flags), type: type, cookie: cookie, offset: offset, length: length)
    }

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
    public var exportName: String
    public var requests: [UInt16]

    public init(exportName: String, requests: [UInt16]) { self.exportName = exportName; self.requests = requests }

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
    public var exportName: String
    public var queries: [String]

    public init(exportName: String, queries: [String]) { self.exportName = exportName; self.queries = queries }

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

    public func encode() -> [UInt8] {
        var w = NBDWriter()
        w.lengthPrefixed(exportName)
        w.u32(UInt32(queries.count))
        for q in queries { w.lengthPrefixed(q) }
        return w.bytes
    }
}
