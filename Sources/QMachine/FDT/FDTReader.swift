/// Decodes a DTB (versions 16–17) into a tree: the inverse of ``FDTBuilder``, used by
/// tests and diagnostics. Every offset and length is checked; a malformed blob throws
/// ``MachineError`` `.badImage`.
public struct FDTNode: Sendable, Equatable {
    /// The node's name with its unit address (`memory@80000000`); "" for the root.
    public var name: String
    /// The node's properties in blob order, with their raw (big-endian) values.
    public var properties: [(name: String, value: [UInt8])]
    /// The child nodes in blob order.
    public var children: [FDTNode]

    /// Nodes are equal when names, properties (in order) and children are equal.
    public static func == (a: FDTNode, b: FDTNode) -> Bool {
        a.name == b.name && a.children == b.children && a.properties.count == b.properties.count
            && zip(a.properties, b.properties).allSatisfy { $0.name == $1.name && $0.value == $1.value }
    }

    /// The value of property `name`, if present.
    public func property(_ name: String) -> [UInt8]? { properties.first { $0.name == name }?.value }

    /// The node at a path relative to this one ("soc/serial@10000000").
    public func node(at path: String) -> FDTNode? {
        var cur = self
        for part in path.split(separator: "/") {
            guard let c = cur.children.first(where: { $0.name == part }) else { return nil }
            cur = c
        }
        return cur
    }

    /// A property read as big-endian 32-bit cells.
    public func cells(_ name: String) -> [UInt32]? {
        guard let v = property(name), v.count % 4 == 0 else { return nil }
        return stride(from: 0, to: v.count, by: 4).map { i in
            UInt32(v[i]) << 24 | UInt32(v[i + 1]) << 16 | UInt32(v[i + 2]) << 8 | UInt32(v[i + 3])
        }
    }

    /// A property read as a list of NUL-terminated strings.
    public func strings(_ name: String) -> [String]? {
        guard let v = property(name), v.last == 0 else { return nil }
        return v.dropLast().split(separator: 0, omittingEmptySubsequences: false).map { String(decoding: $0, as: UTF8.self) }
    }
}

/// Decodes flattened device tree blobs (devicetree spec 0.4 §5) into ``FDTNode`` trees.
public struct FDTReader {
    /// A decoded blob: the tree plus the header fields that are not part of it.
    public struct Blob: Sendable {
        /// The root node.
        public var root: FDTNode
        /// The memory reservation block's entries.
        public var reservations: [(address: UInt64, size: UInt64)]
        /// `boot_cpuid_phys` from the header.
        public var bootCPU: UInt32
        /// The blob's version (16 or 17).
        public var version: UInt32
    }

    /// Decodes the DTB `b`, checking every offset, length and token.
    /// - Throws: ``MachineError`` `.badImage` for a malformed or unsupported blob.
    public static func decode(_ b: [UInt8]) throws -> Blob {
        func bad(_ why: String) -> MachineError { MachineError(.badImage, "malformed device tree: \(why)", operation: "decode DTB") }
        func be32(_ o: Int) throws -> UInt32 {
            guard o >= 0, o + 4 <= b.count else { throw bad("read past the end at \(o)") }
            return UInt32(b[o]) << 24 | UInt32(b[o + 1]) << 16 | UInt32(b[o + 2]) << 8 | UInt32(b[o + 3])
        }
        func be64(_ o: Int) throws -> UInt64 { UInt64(try be32(o)) << 32 | UInt64(try be32(o + 4)) }
        guard b.count >= 40 else { throw bad("shorter than its header") }
        guard try be32(0) == FDTBuilder.magic else { throw bad("bad magic") }
        let total = Int(try be32(4)), offStruct = Int(try be32(8)), offStrings = Int(try be32(12))
        let offRsv = Int(try be32(16)), version = try be32(20), bootCPU = try be32(28)
        let sizeStrings = Int(try be32(32)), sizeStruct = Int(try be32(36))
        guard total <= b.count, offStruct + sizeStruct <= total, offStrings + sizeStrings <= total else {
            throw bad("blocks outside the blob")
        }
        var rsv: [(UInt64, UInt64)] = []
        var o = offRsv
        while true {
            let a = try be64(o), s = try be64(o + 8)
            o += 16
            if a == 0 && s == 0 { break }
            rsv.append((a, s))
        }
        func string(at off: Int) throws -> String {
            guard off >= 0, off < sizeStrings else { throw bad("property name offset \(off) outside the strings block") }
            var e = offStrings + off
            while e < offStrings + sizeStrings && b[e] != 0 { e += 1 }
            guard e < offStrings + sizeStrings else { throw bad("unterminated property name") }
            return String(decoding: b[(offStrings + off)..<e], as: UTF8.self)
        }
        var stack: [FDTNode] = []
        var root: FDTNode?
        o = offStruct
        let end = offStruct + sizeStruct
        loop: while o < end {
            let tok = try be32(o); o += 4
            switch tok {
            case FDTBuilder.Token.beginNode.rawValue:
                var e = o
                while e < end && b[e] != 0 { e += 1 }
                guard e < end else { throw bad("unterminated node name") }
                stack.append(FDTNode(name: String(decoding: b[o..<e], as: UTF8.self), properties: [], children: []))
                o = (e + 1 + 3) & ~3
            case FDTBuilder.Token.endNode.rawValue:
                guard let n = stack.popLast() else { throw bad("unbalanced end of node") }
                if stack.isEmpty { root = n } else { stack[stack.count - 1].children.append(n) }
            case FDTBuilder.Token.prop.rawValue:
                let len = Int(try be32(o)), nameOff = Int(try be32(o + 4))
                o += 8
                guard len >= 0, o + len <= end else { throw bad("property value past the structure block") }
                guard !stack.isEmpty else { throw bad("property outside a node") }
                stack[stack.count - 1].properties.append((try string(at: nameOff), Array(b[o..<(o + len)])))
                o = (o + len + 3) & ~3
            case FDTBuilder.Token.nop.rawValue:
                continue
            case FDTBuilder.Token.end.rawValue:
                break loop
            default:
                throw bad("unknown token \(tok) at \(o - 4)")
            }
        }
        guard stack.isEmpty, let root else { throw bad("no complete root node") }
        return Blob(root: root, reservations: rsv, bootCPU: bootCPU, version: version)
    }
}
