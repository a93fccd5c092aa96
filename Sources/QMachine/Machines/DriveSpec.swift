import Foundation
import QBlock

/// A `--drive` argument: `file=PATH[,format=qcow2|raw][,id=NAME][,node-name=NAME][,readonly=on|off]`
/// (QEMU's -drive syntax, the subset this machine uses; a bare PATH means file=PATH).
/// `node-name` names the format node in the block graph (`vm --qmp`); without it the node
/// is `ID-format`.
public struct DriveSpec: Sendable, Equatable {
    /// The image file (path) or NBD URI.
    public var file: String
    /// The image format (`raw`, `qcow2`), or `nil` to probe it as QEMU does.
    public var format: String?
    /// The drive's `id` (its block backend name for QMP), or `nil` for a generated one.
    public var id: String?
    /// The format node's name for QMP, or `nil` for a generated one.
    public var nodeName: String?
    /// Open the image read-only; the guest sees a read-only virtio-blk device.
    public var readOnly: Bool

    /// Creates a drive for `file`; every other property has QEMU's `-drive` default.
    public init(file: String, format: String? = nil, id: String? = nil, nodeName: String? = nil, readOnly: Bool = false) {
        self.file = file; self.format = format; self.id = id; self.nodeName = nodeName; self.readOnly = readOnly
    }

    /// - Throws: `.invalidArgument` with the offending key.
    public init(parsing text: String) throws {
        var file: String?, format: String?, id: String?, nodeName: String?, ro = false
        // QEMU escapes a comma in a value by doubling it.
        var parts: [String] = []
        var cur = ""
        var chars = Array(text)
        var i = 0
        while i < chars.count {
            if chars[i] == "," {
                if i + 1 < chars.count && chars[i + 1] == "," { cur.append(","); i += 2; continue }
                parts.append(cur); cur = ""
            } else { cur.append(chars[i]) }
            i += 1
        }
        parts.append(cur)
        chars = []
        for (n, p) in parts.enumerated() {
            guard let eq = p.firstIndex(of: "=") else {
                if n == 0 && !p.isEmpty { file = p; continue }
                throw MachineError(.invalidArgument, "drive option '\(p)' has no value", operation: "parse --drive")
            }
            let key = String(p[..<eq]), value = String(p[p.index(after: eq)...])
            switch key {
            case "file": file = value
            case "format":
                guard ImageOpener.formats.contains(value) else {
                    throw MachineError(.invalidArgument, "unknown drive format '\(value)' (raw or qcow2)", operation: "parse --drive")
                }
                format = value
            case "id": id = value
            case "node-name": nodeName = value
            case "readonly":
                switch value {
                case "on", "true", "yes": ro = true
                case "off", "false", "no": ro = false
                default: throw MachineError(.invalidArgument, "readonly takes on or off, not '\(value)'", operation: "parse --drive")
                }
            case "if":
                guard value == "virtio" || value == "none" else {
                    throw MachineError(.invalidArgument, "only virtio drives are supported (if=\(value))", operation: "parse --drive")
                }
            default:
                throw MachineError(.invalidArgument, "unknown drive option '\(key)'", operation: "parse --drive")
            }
        }
        guard let file, !file.isEmpty else {
            throw MachineError(.invalidArgument, "drive '\(text)' has no file=", operation: "parse --drive")
        }
        self.init(file: file, format: format, id: id, nodeName: nodeName, readOnly: ro)
    }

    /// Opens the image through QBlock's opener (backing chains included).
    public func open() async throws -> any BlockDriver {
        try await ImageOpener.open(file, options: OpenOptions(format: format, readOnly: readOnly))
    }
}

/// Memory sizes as QEMU's -m takes them: a number with an optional K, M, G or T suffix
/// (binary units); a bare number means MiB.
public enum MemorySize {
    /// - Throws: `.invalidArgument` for anything else, or a size not a multiple of 4 KiB.
    public static func parse(_ text: String) throws -> UInt64 {
        let t = text.trimmingCharacters(in: .whitespaces)
        guard let last = t.last else { throw MachineError(.invalidArgument, "empty memory size", operation: "parse --memory") }
        var digits = t, shift: UInt64 = 20
        switch last.uppercased() {
        case "K": shift = 10; digits.removeLast()
        case "M": shift = 20; digits.removeLast()
        case "G": shift = 30; digits.removeLast()
        case "T": shift = 40; digits.removeLast()
        case "B": shift = 0; digits.removeLast()
        default: break
        }
        if digits.hasSuffix("i") || digits.hasSuffix("I") { digits.removeLast() }
        guard let n = UInt64(digits), n > 0, n.leadingZeroBitCount >= shift else {
            throw MachineError(.invalidArgument, "invalid memory size '\(text)'", operation: "parse --memory")
        }
        let bytes = n << shift
        guard bytes % 4096 == 0, bytes >= 16 << 20 else {
            throw MachineError(.invalidArgument, "memory size '\(text)' must be at least 16M and a multiple of 4K", operation: "parse --memory")
        }
        return bytes
    }
}
