import QBlock

extension QObject {
    /// The human dump qemu-img uses for "Format specific information" (`dump_qobject`):
    /// one `key: value` line per entry, dashes in keys shown as spaces, nested values
    /// indented four spaces per level.
    package func humanDump(indent: Int) -> String {
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
                let key = String(e.key.map { $0 == "-" ? " " : $0 })
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
