import QBlock

/// The output formats of `qemu-img map`.
package enum MapOutputFormat: String, Sendable {
    /// The table of data runs (`Offset  Length  Mapped to  File`).
    case human
    /// One JSON object per run, in a list.
    case json
}

extension MapEntry {
    /// The entry as one object of `qemu-img map --output=json` (7.2: no "compressed" key).
    package var jsonText: String {
        var s = "{ \"start\": \(start), \"length\": \(length), \"depth\": \(depth), \"present\": \(present), "
            + "\"zero\": \(zero), \"data\": \(data)"
        if let offset { s += ", \"offset\": \(offset)" }
        return s + "}"
    }
}

extension BlockMap {
    /// Renders `qemu-img map` output, handing text to `output` as it is produced (so that
    /// what was printed before an error stays printed, as with qemu-img).
    /// - Throws: ``BlockError`` with qemu-img's message ("File contains external, encrypted
    ///   or compressed clusters." in the human format, "Could not read file metadata: ...").
    package static func render(_ node: any BlockDriver, format: MapOutputFormat, start: Int64 = 0, maxLength: Int64? = nil,
                               output: (String) -> Void) async throws {
        switch format {
        case .human:
            output(pad16("Offset") + pad16("Length") + pad16("Mapped to") + "File\n")
            try await walk(node, start: start, maxLength: maxLength) { e, next in
                if e.data && e.offset == nil {
                    throw BlockError(.unsupported, "File contains external, encrypted or compressed clusters.",
                                     path: node.filename, operation: "map")
                }
                if e.data && !e.zero {
                    output(pad16(hex(e.start)) + pad16(hex(e.length)) + pad16(hex(e.offset ?? 0)) + (e.filename ?? "") + "\n")
                }
                // The human format does not tell zeros from unallocated: merge them.
                if var n = next, !n.data || n.zero, !e.data || e.zero {
                    n.data = false
                    n.zero = true
                    next = n
                }
            }
        case .json:
            output("[")
            try await walk(node, start: start, maxLength: maxLength) { e, next in
                output(e.jsonText + (next != nil ? ",\n" : ""))
            }
            output("]\n")
        }
    }
}

/// `printf("%#x")`: "0" for zero, else "0x..." in lower case.
private func hex(_ v: Int64) -> String { v == 0 ? "0" : "0x" + String(v, radix: 16) }

/// `printf("%-16s")`.
private func pad16(_ s: String) -> String { s.count >= 16 ? s : s + String(repeating: " ", count: 16 - s.count) }
