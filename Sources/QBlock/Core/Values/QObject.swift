#if canImport(Glibc)
import Glibc
#endif

/// A JSON value printed exactly as QEMU prints its QObjects (`qobject_to_json_pretty`),
/// which is what `qemu-img ... --output=json` writes.
///
/// QEMU keeps dictionaries in a hash table of 512 buckets (`QDict`) and prints them in
/// bucket order, newest entry first within a bucket. ``Dict`` keeps insertion order and
/// sorts the same way when printed, so that key order matches byte for byte.
public indirect enum QObject: Sendable, Equatable {
    case int(Int64)
    case bool(Bool)
    case string(String)
    case dict(Dict)
    case list([QObject])
    /// JSON `null` (QMP arguments such as `"backing": null`).
    case null
    /// A JSON number with a fraction or exponent (QEMU's `QNum` holding a double).
    case double(Double)

    /// An insertion-ordered dictionary that iterates in QEMU's `QDict` order.
    public struct Dict: Sendable, Equatable {
        /// The members in insertion order (the order they were parsed or added).
        public private(set) var entries: [(key: String, value: QObject)] = []
        /// Creates an empty dictionary.
        public init() {}
        /// Creates a dictionary from `pairs` in order; a repeated key keeps its first position
        /// and its last value.
        public init(_ pairs: [(String, QObject)]) {
            for (k, v) in pairs { self[k] = v }
        }

        /// Entries whose keys the caller knows to be distinct (the JSON parser): O(n).
        init(distinctEntries: [(key: String, value: QObject)]) {
            entries = distinctEntries
        }

        /// The value of member `key`, or `nil`. Setting `nil` removes the member; setting a new
        /// key appends it, setting an existing one replaces its value in place.
        public subscript(key: String) -> QObject? {
            get { entries.first { $0.key == key }?.value }
            set {
                if let i = entries.firstIndex(where: { $0.key == key }) {
                    if let newValue { entries[i].value = newValue } else { entries.remove(at: i) }
                } else if let newValue {
                    entries.append((key, newValue))
                }
            }
        }

        /// The entries in the order QEMU iterates a QDict holding them.
        public var qemuOrdered: [(key: String, value: QObject)] {
            let indexed = entries.enumerated().map { (bucket: QObject.bucket(of: $0.element.key), index: $0.offset, entry: $0.element) }
            // Within a bucket QEMU inserts at the head of the list: the newest comes first.
            return indexed.sorted { $0.bucket != $1.bucket ? $0.bucket < $1.bucket : $0.index > $1.index }.map(\.entry)
        }

        /// Two dictionaries are equal when they hold the same members in the same order.
        public static func == (a: Dict, b: Dict) -> Bool {
            a.entries.count == b.entries.count && zip(a.entries, b.entries).allSatisfy { $0.key == $1.key && $0.value == $1.value }
        }
    }

    /// QEMU's `tdb_hash(key) % QDICT_BUCKET_MAX`.
    static func bucket(of key: String) -> Int {
        let bytes = Array(key.utf8)
        var value = UInt32(truncatingIfNeeded: 0x238F13AF &* bytes.count)
        for (i, c) in bytes.enumerated() {
            value = value &+ (UInt32(c) << UInt32(i * 5 % 24))
        }
        return Int((1103515243 &* value &+ 12345) % 512)
    }

    /// The pretty JSON text, without a trailing newline (qemu-img adds one).
    public var prettyJSON: String {
        var out = ""
        QObject.write(self, into: &out, indent: 0)
        return out
    }

    private static func newline(_ out: inout String, _ indent: Int) {
        out += "\n" + String(repeating: " ", count: indent * 4)
    }

    private static func write(_ v: QObject, into out: inout String, indent: Int) {
        switch v {
        case .int(let i): out += String(i)
        case .bool(let b): out += b ? "true" : "false"
        case .null: out += "null"
        case .double(let d): out += QObject.doubleText(d)
        case .string(let s): out += quote(s)
        case .dict(let d):
            out += "{"
            for (n, e) in d.qemuOrdered.enumerated() {
                if n > 0 { out += "," }
                newline(&out, indent + 1)
                out += quote(e.key) + ": "
                write(e.value, into: &out, indent: indent + 1)
            }
            newline(&out, indent)
            out += "}"
        case .list(let l):
            out += "["
            for (n, e) in l.enumerated() {
                if n > 0 { out += "," }
                newline(&out, indent + 1)
                write(e, into: &out, indent: indent + 1)
            }
            newline(&out, indent)
            out += "]"
        }
    }

    /// A JSON string literal escaped as QEMU's `to_json` does.
    public static func quote(_ s: String) -> String {
        var out = "\""
        for u in s.unicodeScalars {
            switch u {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\u{08}": out += "\\b"
            case "\u{0C}": out += "\\f"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            default:
                let cp = u.value
                if cp > 0xFFFF {
                    let v = cp - 0x10000
                    out += hex4(0xD800 + (v >> 10)) + hex4(0xDC00 + (v & 0x3FF))
                } else if cp < 0x20 || cp >= 0x7F {
                    out += hex4(cp)
                } else {
                    out.unicodeScalars.append(u)
                }
            }
        }
        return out + "\""
    }

    private static func hex4(_ v: UInt32) -> String {
        let h = String(v, radix: 16, uppercase: true)
        return "\\u" + String(repeating: "0", count: max(0, 4 - h.count)) + h
    }

    /// The human dump qemu-img uses for "Format specific information" (`dump_qobject`):
    /// one `key: value` line per entry, dashes in keys shown as spaces, nested values
    /// indented four spaces per level.
    public func humanDump(indent: Int) -> String {
        var out = ""
        QObject.dump(self, into: &out, indent: indent)
        return out
    }

    private static func scalarText(_ v: QObject) -> String? {
        switch v {
        case .int(let i): return String(i)
        case .bool(let b): return b ? "true" : "false"
        case .string(let s): return s
        case .null: return "null"
        case .double(let d): return QObject.doubleText(d)
        default: return nil
        }
    }

    private static func dump(_ v: QObject, into out: inout String, indent: Int) {
        let pad = String(repeating: " ", count: indent * 4)
        switch v {
        case .dict(let d):
            for e in d.qemuOrdered {
                let key = e.key.replacingDashes()
                if let s = scalarText(e.value) {
                    out += "\(pad)\(key): \(s)\n"
                } else {
                    out += "\(pad)\(key):\n"
                    dump(e.value, into: &out, indent: indent + 1)
                }
            }
        case .list(let l):
            for (i, e) in l.enumerated() {
                if let s = scalarText(e) {
                    out += "\(pad)[\(i)]: \(s)\n"
                } else {
                    out += "\(pad)[\(i)]:\n"
                    dump(e, into: &out, indent: indent + 1)
                }
            }
        default:
            if let s = scalarText(v) { out += "\(pad)\(s)\n" }
        }
    }
}

extension String {
    func replacingDashes() -> String { String(map { $0 == "-" ? " " : $0 }) }
}

/// Sizes for people, as QEMU's `size_to_str` writes them: "1 GiB", "196 KiB", "1.5 MiB".
public func qemuSizeString(_ value: Int64) -> String {
    let suffixes = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"]
    let v = Double(UInt64(bitPattern: value))
    var exp: Int32 = 0
    _ = frexp(v / (1000.0 / 1024.0), &exp)
    let i = max(0, min(6, Int((exp - 1) / 10)))
    let div = Double(UInt64(1) << UInt64(i * 10))
    return formatG3(v / div) + " " + suffixes[i] + "B"
}

/// `printf("%0.3g", v)`.
func formatG3(_ v: Double) -> String { cFormat("%0.3g", v) }

/// `printf(format, v)` for one floating-point value.
package func cFormat(_ format: String, _ v: Double) -> String {
    var buf = [CChar](repeating: 0, count: 64)
    _ = withVaList([v]) { vsnprintf(&buf, buf.count, format, $0) }
    return String(decoding: buf.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
}
