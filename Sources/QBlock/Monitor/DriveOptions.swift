import QBlockCore
import QBlockDrivers
import QBlockGraph
import QBlockOpen

/// The option syntaxes QEMU's tools accept besides a plain file name, turned into one
/// options dictionary (QEMU's `QDict` of `bdrv_open`):
///
/// - a QemuOpts string, as `--image-opts` and qemu-io's `open -o` take it:
///   `driver=qcow2,file.filename=/img.qcow2,l2-cache-size=1M` (``parse(_:impliedKey:)``);
/// - a `json:` pseudo-filename: `json:{"driver": "qcow2", "file": {"filename": "/img"}}`,
///   nested or with dotted keys (``parseJSONFilename(_:)``).
///
/// Both give dotted keys (``flatten(_:)``); ``crumple(_:)`` nests them
/// (`file.filename` → `file: {filename}`) for ``DriveOpener``.
public enum DriveOptions {
    /// Parses a QemuOpts string: `key=value` pairs separated by commas, `,,` standing for a
    /// comma inside a value. A first element without `=` is the value of `impliedKey` when
    /// there is one; any other element without `=` is `key=on` (`nokey`: `key=off`), which
    /// QEMU deprecates: `warning` gets its two-line message. An `id` member is dropped, as
    /// QemuOpts keeps it apart, unless `keepID`. Values stay strings (``DriveOpener`` converts
    /// them as each driver needs).
    public static func parse(_ text: String, impliedKey: String? = nil, keepID: Bool = false,
                             warning: ((String) -> Void)? = nil) throws -> QObject.Dict {
        var result = QObject.Dict()
        let chars = Array(text)
        var p = 0
        var implied = impliedKey
        // A value runs to the next single comma; ",," is a comma in it.
        func readValue() -> String {
            var v = ""
            while p < chars.count {
                if chars[p] == "," {
                    if p + 1 < chars.count && chars[p + 1] == "," { v.append(","); p += 2; continue }
                    break
                }
                v.append(chars[p])
                p += 1
            }
            return v
        }
        while p < chars.count {
            var end = p
            while end < chars.count && chars[end] != "=" && chars[end] != "," { end += 1 }
            let key: String
            let value: String
            if end < chars.count && chars[end] == "=" {
                key = String(chars[p..<end])
                p = end + 1
                value = readValue()
            } else if let first = implied {
                key = first
                value = readValue()
            } else {
                let name = String(chars[p..<end])
                p = end
                if name.hasPrefix("no") {
                    key = String(name.dropFirst(2))
                    value = "off"
                } else {
                    key = name
                    value = "on"
                }
                if name != "help" && name != "?" {
                    warning?("short-form boolean option '\(name)' deprecated\nPlease use \(key)=\(value) instead")
                }
            }
            implied = nil
            if p < chars.count && chars[p] == "," { p += 1 }
            if key == "id" && !keepID { continue }
            result[key] = .string(value)
        }
        return result
    }

    /// Whether `filename` is a `json:` pseudo-filename.
    public static func isJSONFilename(_ filename: String) -> Bool { filename.hasPrefix("json:") }

    /// The options of a `json:{...}` pseudo-filename, flattened to dotted keys.
    /// - Throws: ``QMPError`` "Could not parse the JSON options: …" for bad JSON, "Invalid
    ///   JSON object given" for JSON that is not an object (QEMU's messages).
    public static func parseJSONFilename(_ filename: String) throws -> QObject.Dict {
        let text = String(filename.dropFirst("json:".count))
        let value: QObject
        do {
            value = try QObject.parseJSON(text)
        } catch {
            throw QMPError.generic("Could not parse the JSON options: \(QMPError.from(error).desc)")
        }
        guard case .dict(let d) = value else { throw QMPError.generic("Invalid JSON object given") }
        return flatten(d)
    }

    /// The members of `dict` with nested objects spelled as dotted keys (`file.filename`);
    /// lists and scalars are kept as they are (QEMU's `qdict_flatten`).
    public static func flatten(_ dict: QObject.Dict) -> QObject.Dict {
        var out = QObject.Dict()
        func add(_ d: QObject.Dict, prefix: String) {
            for (k, v) in d.entries {
                let key = prefix.isEmpty ? k : "\(prefix).\(k)"
                if case .dict(let inner) = v, !inner.entries.isEmpty {
                    add(inner, prefix: key)
                } else {
                    out[key] = v
                }
            }
        }
        add(dict, prefix: "")
        return out
    }

    /// Nests dotted keys into objects (`file.filename=x` → `file: {filename: x}`, QEMU's
    /// `qdict_crumple` for objects).
    /// - Throws: ``QMPError`` when a key is both a value and an object
    ///   (`file=x,file.filename=y`).
    public static func crumple(_ flat: QObject.Dict) throws -> QObject.Dict {
        var out = QObject.Dict()
        var groups: [(String, QObject.Dict)] = []
        for (k, v) in flat.entries {
            if let dot = k.firstIndex(of: ".") {
                let head = String(k[..<dot]), rest = String(k[k.index(after: dot)...])
                if let i = groups.firstIndex(where: { $0.0 == head }) {
                    groups[i].1[rest] = v
                } else {
                    groups.append((head, QObject.Dict([(rest, v)])))
                    out[head] = .null // keeps the member's place
                }
            } else if case .dict(let d) = v {
                // An already nested member: merged with dotted keys of the same name.
                for (ik, iv) in flatten(d).entries {
                    if let i = groups.firstIndex(where: { $0.0 == k }) { groups[i].1[ik] = iv } else {
                        groups.append((k, QObject.Dict([(ik, iv)])))
                        out[k] = .null
                    }
                }
                if d.entries.isEmpty { out[k] = v }
            } else {
                out[k] = v
            }
        }
        for (head, members) in groups {
            if let scalar = flat[head], !isDict(scalar) {
                throw QMPError.generic("Cannot use '\(head)' both as a value and as an object of options ('\(head).\(members.entries[0].key)')")
            }
            out[head] = listOrDict(try crumple(members))
        }
        return out
    }

    /// An object whose keys are 0, 1, … n-1 (in any order) as the list of its values, as
    /// QEMU's `qdict_crumple` reads `inject-error.0.event=…`; any other object as it is.
    private static func listOrDict(_ d: QObject.Dict) -> QObject {
        let indices = d.entries.map { $0.key.allSatisfy(\.isNumber) ? Int($0.key) : nil }
        guard !indices.isEmpty, indices.allSatisfy({ $0 != nil }),
              Set(indices.compactMap { $0 }) == Set(0..<d.entries.count) else { return .dict(d) }
        return .list((0..<d.entries.count).map { d[String($0)] ?? .null })
    }

    private static func isDict(_ v: QObject) -> Bool {
        if case .dict = v { return true }
        return false
    }
}

/// How a value given as a string (QemuOpts, `json:` strings) reads as a boolean, number or
/// size, with QEMU's spellings.
enum KeyvalValue {
    /// "on"/"yes"/"true"/"y" and "off"/"no"/"false"/"n".
    static func bool(_ s: String) -> Bool? {
        switch s {
        case "on", "yes", "true", "y": return true
        case "off", "no", "false", "n": return false
        default: return nil
        }
    }

    /// A decimal, `0x` hexadecimal or octal integer, optionally negative.
    static func int(_ s: String) -> Int64? {
        var t = Substring(s)
        var negative = false
        if t.first == "-" { negative = true; t = t.dropFirst() } else if t.first == "+" { t = t.dropFirst() }
        let v: Int64?
        if t.hasPrefix("0x") || t.hasPrefix("0X") {
            v = Int64(t.dropFirst(2), radix: 16)
        } else if t.count > 1 && t.hasPrefix("0") {
            v = Int64(t.dropFirst(), radix: 8)
        } else {
            v = Int64(t)
        }
        guard let v else { return nil }
        return negative ? -v : v
    }

    /// A size as QEMU's `qemu_strtosz`: a number (a fraction allowed with a suffix) and an
    /// optional suffix B, K, M, G, T, P, E (powers of 1024, either case).
    static func size(_ s: String) -> UInt64? {
        if s.hasPrefix("0x") || s.hasPrefix("0X") { return UInt64(s.dropFirst(2), radix: 16) }
        var digits = Substring(s)
        var multiplier: Double = 1
        if let last = digits.last, last.isLetter {
            let shifts: [Character: Double] = ["B": 0, "K": 10, "M": 20, "G": 30, "T": 40, "P": 50, "E": 60]
            guard let shift = shifts[Character(last.uppercased())] else { return nil }
            multiplier = Double(sign: .plus, exponent: Int(shift), significand: 1)
            digits = digits.dropLast()
        }
        guard !digits.isEmpty, digits.allSatisfy({ $0.isNumber || $0 == "." }), let value = Double(digits) else { return nil }
        if multiplier == 1 && digits.contains(".") { return nil }
        let bytes = value * multiplier
        guard bytes < 18446744073709551616.0 else { return nil }
        return UInt64(bytes)
    }

    /// QEMU's error for a size it cannot read.
    static func sizeError(_ name: String) -> QMPError {
        .generic("Parameter '\(name)' expects a non-negative number below 2^64\n"
                 + "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
                 + "and exabytes, respectively.")
    }
}
