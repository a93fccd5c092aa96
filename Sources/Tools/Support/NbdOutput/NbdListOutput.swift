import QBlock

/// `qemu-nbd --list`'s report of a server's exports, byte for byte.
package enum NbdListOutput {
    /// The names qemu-nbd gives the transmission flag bits, by bit number.
    static let flagNames: [Int: String] = [
        1: "readonly", 2: "flush", 3: "fua", 4: "rotational", 5: "trim", 6: "zeroes", 7: "df",
        8: "multi", 9: "resize", 10: "cache", 11: "fast-zero",
    ]

    /// "exports available: N", then per export its name, description, size, flags (with
    /// the names of the bits set), block sizes and metadata contexts.
    package static func render(_ exports: [NBDExportListing]) -> String {
        var s = "exports available: \(exports.count)\n"
        for e in exports {
            s += " export: '\(e.name)'\n"
            if !e.description.isEmpty { s += "  description: \(e.description)\n" }
            if let info = e.info, info.flags.contains(.hasFlags) {
                let raw = info.flags.rawValue
                s += "  size:  \(info.size)\n"
                s += "  flags: 0x\(String(raw, radix: 16)) ("
                for bit in 0..<16 where raw & (1 << bit) != 0 {
                    if let name = flagNames[bit] { s += " \(name)" }
                }
                s += " )\n"
            }
            if let info = e.info, e.hasBlockSizes {
                s += "  min block: \(info.minimumBlockSize)\n"
                s += "  opt block: \(info.preferredBlockSize)\n"
                s += "  max block: \(info.maximumBlockSize)\n"
            }
            if !e.metaContexts.isEmpty {
                s += "  available meta contexts: \(e.metaContexts.count)\n"
                for c in e.metaContexts { s += "   \(c)\n" }
            }
        }
        return s
    }
}
