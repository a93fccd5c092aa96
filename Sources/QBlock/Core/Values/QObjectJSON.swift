#if canImport(Glibc)
import Glibc
#endif

// JSON for the QMP wire: the compact encoder QEMU's monitor writes (`qobject_to_json`), a
// parser with QEMU's error texts (`json-parser.c`), and the byte streamer that cuts a
// socket's input into messages (`json-streamer.c`).

/// Malformed JSON, with the message QEMU's parser gives (`JSON parse error, ...`).
public struct JSONParseError: Error, Sendable, Equatable, CustomStringConvertible {
    /// QEMU's wording of what is wrong.
    public let message: String
    /// An error with `message`.
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

extension QObject {
    /// The compact JSON QEMU writes on the QMP wire: `{"a": 1, "b": [1, 2]}`, keys in
    /// QEMU's `QDict` order.
    public var compactJSON: String {
        var out = ""
        QObject.writeCompact(self, into: &out)
        return out
    }

    private static func writeCompact(_ v: QObject, into out: inout String) {
        switch v {
        case .int(let i): out += String(i)
        case .bool(let b): out += b ? "true" : "false"
        case .null: out += "null"
        case .double(let d): out += doubleText(d)
        case .string(let s): out += quote(s)
        case .dict(let d):
            out += "{"
            for (n, e) in d.qemuOrdered.enumerated() {
                if n > 0 { out += ", " }
                out += quote(e.key) + ": "
                writeCompact(e.value, into: &out)
            }
            out += "}"
        case .list(let l):
            out += "["
            for (n, e) in l.enumerated() {
                if n > 0 { out += ", " }
                writeCompact(e, into: &out)
            }
            out += "]"
        }
    }

    /// A double as QEMU's JSON writer prints it (`%.17g`).
    package static func doubleText(_ d: Double) -> String {
        if !d.isFinite { return "null" }
        return cFormat("%.17g", d)
    }

    /// The dictionary, if this is one.
    public var dictValue: Dict? { if case .dict(let d) = self { return d } else { return nil } }
    /// The string, if this is one.
    public var stringValue: String? { if case .string(let s) = self { return s } else { return nil } }
    /// The integer, if this is one.
    public var intValue: Int64? { if case .int(let i) = self { return i } else { return nil } }
    /// The boolean, if this is one.
    public var boolValue: Bool? { if case .bool(let b) = self { return b } else { return nil } }
    /// The list, if this is one.
    public var listValue: [QObject]? { if case .list(let l) = self { return l } else { return nil } }

    /// Parses one JSON value (QEMU's JSON dialect: single-quoted strings are accepted too).
    /// - Throws: ``JSONParseError`` with QEMU's parse error text.
    public static func parseJSON(_ text: String) throws -> QObject {
        var p = QMPJSONParser(bytes: Array(text.utf8))
        return try p.parseDocument()
    }
}

/// A recursive-descent JSON parser with QEMU's error messages.
struct QMPJSONParser {
    static let maxDepth = 1024
    let bytes: [UInt8]
    var pos = 0
    var depth = 0

    init(bytes: [UInt8]) { self.bytes = bytes }

    private func error(_ what: String) -> JSONParseError { JSONParseError("JSON parse error, \(what)") }

    mutating func parseDocument() throws -> QObject {
        skipSpace()
        let v = try parseValue()
        skipSpace()
        if pos < bytes.count { throw error("expecting value") }
        return v
    }

    private mutating func skipSpace() {
        while pos < bytes.count, bytes[pos] == 0x20 || bytes[pos] == 0x0A || bytes[pos] == 0x0D || bytes[pos] == 0x09 { pos += 1 }
    }

    private mutating func parseValue() throws -> QObject {
        guard pos < bytes.count else { throw error("expecting value") }
        let c = bytes[pos]
        switch c {
        case UInt8(ascii: "{"): return try parseObject()
        case UInt8(ascii: "["): return try parseArray()
        case UInt8(ascii: "\""), UInt8(ascii: "'"): return .string(try parseString())
        case UInt8(ascii: "-"), UInt8(ascii: "0")...UInt8(ascii: "9"): return try parseNumber()
        case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"):
            let start = pos
            while pos < bytes.count, isWordByte(bytes[pos]) { pos += 1 }
            let word = String(decoding: bytes[start..<pos], as: UTF8.self)
            switch word {
            case "true": return .bool(true)
            case "false": return .bool(false)
            case "null": return .null
            default: throw error("invalid keyword '\(word)'")
            }
        default:
            if c < 0x20 || c >= 0x7F { throw JSONParseError("JSON parse error, stray '\(Self.printable(c))'") }
            throw error("expecting value")
        }
    }

    private func isWordByte(_ c: UInt8) -> Bool {
        (c >= UInt8(ascii: "a") && c <= UInt8(ascii: "z")) || (c >= UInt8(ascii: "A") && c <= UInt8(ascii: "Z"))
    }

    static func printable(_ c: UInt8) -> String {
        c >= 0x20 && c < 0x7F ? String(UnicodeScalar(c)) : "\\x" + String(c, radix: 16)
    }

    private mutating func enter() throws {
        depth += 1
        if depth > Self.maxDepth { throw JSONParseError("JSON nesting depth limit exceeded") }
    }

    private mutating func parseObject() throws -> QObject {
        try enter()
        defer { depth -= 1 }
        pos += 1
        var entries: [(key: String, value: QObject)] = []
        var keys = Set<String>()
        skipSpace()
        if pos < bytes.count, bytes[pos] == UInt8(ascii: "}") { pos += 1; return .dict(QObject.Dict()) }
        while true {
            skipSpace()
            guard pos < bytes.count else { throw error("premature EOI") }
            guard bytes[pos] == UInt8(ascii: "\"") || bytes[pos] == UInt8(ascii: "'") else {
                if bytes[pos] == UInt8(ascii: "}") { throw error("expecting value") }
                throw error("key is not a string in object")
            }
            let key = try parseString()
            skipSpace()
            guard pos < bytes.count, bytes[pos] == UInt8(ascii: ":") else { throw error("missing : in object pair") }
            pos += 1
            skipSpace()
            let value = try parseValue()
            if !keys.insert(key).inserted { throw error("duplicate key") }
            entries.append((key, value))
            skipSpace()
            guard pos < bytes.count else { throw error("premature EOI") }
            if bytes[pos] == UInt8(ascii: ",") { pos += 1; continue }
            if bytes[pos] == UInt8(ascii: "}") { pos += 1; return .dict(QObject.Dict(distinctEntries: entries)) }
            throw error("expected separator in dict")
        }
    }

    private mutating func parseArray() throws -> QObject {
        try enter()
        defer { depth -= 1 }
        pos += 1
        var list: [QObject] = []
        skipSpace()
        if pos < bytes.count, bytes[pos] == UInt8(ascii: "]") { pos += 1; return .list(list) }
        while true {
            skipSpace()
            list.append(try parseValue())
            skipSpace()
            guard pos < bytes.count else { throw error("premature EOI") }
            if bytes[pos] == UInt8(ascii: ",") { pos += 1; continue }
            if bytes[pos] == UInt8(ascii: "]") { pos += 1; return .list(list) }
            throw error("expected separator in list")
        }
    }

    private mutating func parseString() throws -> String {
        let quote = bytes[pos]
        pos += 1
        var out: [UInt8] = []
        while true {
            guard pos < bytes.count else { throw error("premature EOI") }
            let c = bytes[pos]
            pos += 1
            if c == quote { break }
            if c < 0x20 { throw error("control character in string") }
            if c != UInt8(ascii: "\\") { out.append(c); continue }
            guard pos < bytes.count else { throw error("premature EOI") }
            let e = bytes[pos]
            pos += 1
            switch e {
            case UInt8(ascii: "\""), UInt8(ascii: "'"), UInt8(ascii: "\\"), UInt8(ascii: "/"): out.append(e)
            case UInt8(ascii: "b"): out.append(0x08)
            case UInt8(ascii: "f"): out.append(0x0C)
            case UInt8(ascii: "n"): out.append(0x0A)
            case UInt8(ascii: "r"): out.append(0x0D)
            case UInt8(ascii: "t"): out.append(0x09)
            case UInt8(ascii: "u"):
                var cp = try hex4()
                if cp >= 0xD800 && cp < 0xDC00 {
                    guard pos + 1 < bytes.count, bytes[pos] == UInt8(ascii: "\\"), bytes[pos + 1] == UInt8(ascii: "u") else {
                        throw error("missing second half of surrogate pair")
                    }
                    pos += 2
                    let lo = try hex4()
                    guard lo >= 0xDC00 && lo < 0xE000 else { throw error("invalid second half of surrogate pair") }
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00)
                } else if cp >= 0xDC00 && cp < 0xE000 {
                    throw error("unpaired second half of surrogate pair")
                }
                guard cp != 0, let scalar = UnicodeScalar(cp) else { throw error("\\u0000 is not supported") }
                out.append(contentsOf: Array(String(Character(scalar)).utf8))
            default:
                throw error("invalid escape sequence in string")
            }
        }
        guard let s = String(validating: out, as: UTF8.self) else { throw error("invalid UTF-8 sequence in string") }
        return s
    }

    private mutating func hex4() throws -> UInt32 {
        guard pos + 4 <= bytes.count else { throw error("premature EOI") }
        var v: UInt32 = 0
        for _ in 0..<4 {
            let c = bytes[pos]
            pos += 1
            let d: UInt32
            switch c {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): d = UInt32(c - UInt8(ascii: "0"))
            case UInt8(ascii: "a")...UInt8(ascii: "f"): d = UInt32(c - UInt8(ascii: "a") + 10)
            case UInt8(ascii: "A")...UInt8(ascii: "F"): d = UInt32(c - UInt8(ascii: "A") + 10)
            default: throw error("invalid hex escape sequence in string")
            }
            v = v << 4 | d
        }
        return v
    }

    private mutating func parseNumber() throws -> QObject {
        let start = pos
        if bytes[pos] == UInt8(ascii: "-") { pos += 1 }
        var isDouble = false
        while pos < bytes.count {
            let c = bytes[pos]
            if c >= UInt8(ascii: "0") && c <= UInt8(ascii: "9") { pos += 1; continue }
            if c == UInt8(ascii: ".") || c == UInt8(ascii: "e") || c == UInt8(ascii: "E")
                || ((c == UInt8(ascii: "+") || c == UInt8(ascii: "-")) && pos > start
                    && (bytes[pos - 1] == UInt8(ascii: "e") || bytes[pos - 1] == UInt8(ascii: "E"))) {
                isDouble = true
                pos += 1
                continue
            }
            break
        }
        let text = String(decoding: bytes[start..<pos], as: UTF8.self)
        if !isDouble, let i = Int64(text) { return .int(i) }
        guard let d = Double(text), text != "-" else { throw error("invalid number '\(text)'") }
        return .double(d)
    }
}

/// Cuts a byte stream into JSON messages, as QEMU's JSON streamer does: a message ends
/// where its outermost brace or bracket closes (or, for a bare scalar, at the next
/// delimiter). Oversized or too deeply nested input is reported once and skipped up to
/// the next newline, so a hostile client cannot make the monitor buffer without bound.
package struct QMPStreamer {
    /// Largest message accepted, in bytes.
    var maxMessageSize = 16 << 20

    package enum Output: Equatable {
        case message(QObject)
        case error(String)
    }

    private var buffer: [UInt8] = []
    private var depth = 0
    private var inString: UInt8 = 0
    private var escaped = false
    private var scalar = false
    private var discarding = false

    package init(maxMessageSize: Int = 16 << 20) { self.maxMessageSize = maxMessageSize }

    /// Feeds received bytes; returns the messages (and errors) they complete.
    package mutating func feed(_ input: UnsafeRawBufferPointer) -> [Output] {
        var out: [Output] = []
        // SAFETY: `input` holds bytes, so binding it as UInt8 is valid; every index below stays in
        // `0..<end` and the pointer is not kept past `feed`.
        guard let base = input.baseAddress?.assumingMemoryBound(to: UInt8.self) else { return out }
        let end = input.count
        var i = 0
        while i < end {
            if discarding {
                // Skip to the next newline at C speed.
                guard let nl = memchr(base + i, 0x0A, end - i) else { return out }
                // SAFETY: `nl` was returned by memchr within `base[i..<end]`, memory already bound to
                // UInt8.
                i = base.distance(to: nl.assumingMemoryBound(to: UInt8.self)) + 1
                discarding = false
                reset()
                continue
            }
            if inString != 0 && !escaped {
                // Copy the run up to the next quote or backslash in one go.
                // SAFETY: memchr searches `base[i..<end]` (and the backslash search stops at `q`), so
                // any match lies inside `input`, bound to UInt8.
                let q = memchr(base + i, Int32(inString), end - i).map { base.distance(to: $0.assumingMemoryBound(to: UInt8.self)) } ?? end
                let b = memchr(base + i, 0x5C, min(q, end) - i).map { base.distance(to: $0.assumingMemoryBound(to: UInt8.self)) } ?? end
                let stop = min(q, b)
                if stop > i {
                    buffer.append(contentsOf: UnsafeBufferPointer(start: base + i, count: stop - i))
                    i = stop
                    if buffer.count > maxMessageSize { overflow("JSON token size limit exceeded", &out); continue }
                    if i == end { break }
                }
            }
            let c = base[i]
            i += 1
            if inString != 0 {
                buffer.append(c)
                if escaped { escaped = false } else if c == UInt8(ascii: "\\") { escaped = true } else if c == inString {
                    inString = 0
                    if depth == 0 { out.append(complete()) }
                }
                continue
            }
            let isSpace = c == 0x20 || c == 0x0A || c == 0x0D || c == 0x09
            if scalar && depth == 0 && (isSpace || c == UInt8(ascii: "{") || c == UInt8(ascii: "[")
                                        || c == UInt8(ascii: "}") || c == UInt8(ascii: "]")
                                        || c == UInt8(ascii: "\"") || c == UInt8(ascii: "'")) {
                scalar = false
                out.append(complete())
            }
            switch c {
            case UInt8(ascii: "{"), UInt8(ascii: "["):
                depth += 1
                buffer.append(c)
                if depth > QMPJSONParser.maxDepth { overflow("JSON nesting depth limit exceeded", &out); continue }
            case UInt8(ascii: "}"), UInt8(ascii: "]"):
                if depth == 0 {
                    out.append(.error("JSON parse error, expecting value"))
                    continue
                }
                depth -= 1
                buffer.append(c)
                if depth == 0 { out.append(complete()) }
            case UInt8(ascii: "\""), UInt8(ascii: "'"):
                inString = c
                buffer.append(c)
            default:
                if isSpace {
                    if depth > 0 { buffer.append(c) }
                } else {
                    if depth == 0 { scalar = true }
                    buffer.append(c)
                }
            }
            if buffer.count > maxMessageSize { overflow("JSON token size limit exceeded", &out) }
        }
        return out
    }

    private mutating func overflow(_ message: String, _ out: inout [Output]) {
        out.append(.error(message))
        reset()
        discarding = true
    }

    private mutating func reset() {
        buffer.removeAll(keepingCapacity: buffer.count < 65536)
        depth = 0
        inString = 0
        escaped = false
        scalar = false
    }

    private mutating func complete() -> Output {
        var p = QMPJSONParser(bytes: buffer)
        let result: Output
        do {
            result = .message(try p.parseDocument())
        } catch let e as JSONParseError {
            result = .error(e.message)
        } catch {
            result = .error("Invalid JSON syntax")
        }
        reset()
        return result
    }
}
