/// Builds a flattened device tree blob (DTB), format version 17, as the Devicetree
/// Specification v0.4, chapter 5 ("Flattened Devicetree (DTB) Format") describes it:
///
/// ```
/// +---------------------------+ 0
/// | fdt_header (40 bytes)     |   magic 0xd00dfeed, totalsize, offsets, version 17, ...
/// +---------------------------+ off_mem_rsvmap (8-aligned)
/// | memory reservation map    |   (address, size) u64 pairs, ended by (0, 0)
/// +---------------------------+ off_dt_struct (4-aligned)
/// | structure block           |   FDT_BEGIN_NODE name / FDT_PROP len nameoff value /
/// |                           |   FDT_END_NODE ... FDT_END, every token 4-aligned
/// +---------------------------+ off_dt_strings
/// | strings block             |   NUL-terminated property names, shared
/// +---------------------------+ totalsize
/// ```
/// Every field is big-endian and written one at a time; nothing is byte-swapped in bulk.
public struct FDTBuilder: Sendable {
    enum Token: UInt32 {
        case beginNode = 1, endNode = 2, prop = 3, nop = 4, end = 9
    }
    /// The FDT header magic (devicetree spec 0.4 §5.2).
    public static let magic: UInt32 = 0xd00d_feed

    private var structure: [UInt8] = []
    private var strings: [UInt8] = []
    private var stringOffsets: [String: UInt32] = [:]
    private var reservations: [(address: UInt64, size: UInt64)] = []
    private var depth = 0
    private var phandles: UInt32 = 0
    /// The boot CPU's physical id (header field).
    public var bootCPU: UInt32 = 0

    /// Creates an empty tree; begin with the root node.
    public init() {}

    /// A fresh phandle value (1, 2, ...) to give a node with ``property(_:u32:)`` "phandle".
    public mutating func allocatePhandle() -> UInt32 {
        phandles += 1
        return phandles
    }

    /// Adds a memory reservation entry.
    public mutating func reserve(address: UInt64, size: UInt64) {
        reservations.append((address, size))
    }

    /// Opens a node; the root node's name is "".
    public mutating func beginNode(_ name: String) {
        appendToken(.beginNode)
        structure.append(contentsOf: Array(name.utf8))
        structure.append(0)
        pad(&structure, to: 4)
        depth += 1
    }

    /// Closes the innermost open node (FDT_END_NODE); a precondition checks one is open.
    public mutating func endNode() {
        precondition(depth > 0, "FDTBuilder: endNode without beginNode")
        appendToken(.endNode)
        depth -= 1
    }

    /// A property with raw bytes as its value.
    public mutating func property(_ name: String, bytes: [UInt8]) {
        appendToken(.prop)
        appendBE32(&structure, UInt32(bytes.count))
        appendBE32(&structure, stringOffset(name))
        structure.append(contentsOf: bytes)
        pad(&structure, to: 4)
    }

    /// An empty property ("interrupt-controller;").
    public mutating func property(_ name: String) { property(name, bytes: []) }

    /// A string property (NUL-terminated).
    public mutating func property(_ name: String, string: String) {
        property(name, strings: [string])
    }

    /// A string-list property ("a\0b\0").
    public mutating func property(_ name: String, strings list: [String]) {
        var b: [UInt8] = []
        for s in list { b.append(contentsOf: Array(s.utf8)); b.append(0) }
        property(name, bytes: b)
    }

    /// A property of one 32-bit cell.
    public mutating func property(_ name: String, u32 value: UInt32) {
        property(name, cells: [value])
    }

    /// A property of one 64-bit value (two cells, high first).
    public mutating func property(_ name: String, u64 value: UInt64) {
        property(name, cells: [UInt32(truncatingIfNeeded: value >> 32), UInt32(truncatingIfNeeded: value)])
    }

    /// A property of 32-bit cells.
    public mutating func property(_ name: String, cells: [UInt32]) {
        var b: [UInt8] = []
        b.reserveCapacity(cells.count * 4)
        for c in cells { appendBE32(&b, c) }
        property(name, bytes: b)
    }

    /// The finished blob.
    public func finish() -> [UInt8] {
        precondition(depth == 0, "FDTBuilder: \(depth) node(s) left open")
        var rsv: [UInt8] = []
        for r in reservations { appendBE64(&rsv, r.address); appendBE64(&rsv, r.size) }
        appendBE64(&rsv, 0); appendBE64(&rsv, 0)
        var structBlock = structure
        appendBE32(&structBlock, Token.end.rawValue)

        let headerSize = 40
        let offRsv = 40                       // 8-aligned already
        let offStruct = offRsv + rsv.count    // rsv.count is a multiple of 16
        let offStrings = offStruct + structBlock.count
        let total = offStrings + strings.count

        var out: [UInt8] = []
        out.reserveCapacity(total)
        appendBE32(&out, Self.magic)
        appendBE32(&out, UInt32(total))
        appendBE32(&out, UInt32(offStruct))
        appendBE32(&out, UInt32(offStrings))
        appendBE32(&out, UInt32(offRsv))
        appendBE32(&out, 17)                  // version
        appendBE32(&out, 16)                  // last compatible version
        appendBE32(&out, bootCPU)
        appendBE32(&out, UInt32(strings.count))
        appendBE32(&out, UInt32(structBlock.count))
        assert(out.count == headerSize)
        out.append(contentsOf: rsv)
        out.append(contentsOf: structBlock)
        out.append(contentsOf: strings)
        return out
    }

    // MARK: - Encoding helpers

    private mutating func appendToken(_ t: Token) { appendBE32(&structure, t.rawValue) }

    private mutating func stringOffset(_ name: String) -> UInt32 {
        if let o = stringOffsets[name] { return o }
        let o = UInt32(strings.count)
        strings.append(contentsOf: Array(name.utf8))
        strings.append(0)
        stringOffsets[name] = o
        return o
    }
}

@inline(__always) func appendBE32(_ b: inout [UInt8], _ v: UInt32) {
    b.append(UInt8(truncatingIfNeeded: v >> 24)); b.append(UInt8(truncatingIfNeeded: v >> 16))
    b.append(UInt8(truncatingIfNeeded: v >> 8)); b.append(UInt8(truncatingIfNeeded: v))
}

@inline(__always) func appendBE64(_ b: inout [UInt8], _ v: UInt64) {
    appendBE32(&b, UInt32(truncatingIfNeeded: v >> 32)); appendBE32(&b, UInt32(truncatingIfNeeded: v))
}

@inline(__always) func pad(_ b: inout [UInt8], to alignment: Int) {
    while b.count % alignment != 0 { b.append(0) }
}
