#if canImport(Glibc)
import Glibc
#endif
import QBlockCore
/// The qcow2 image header (QEMU's `docs/interop/qcow2.txt`, "Header").
///
/// ```
///  cluster 0                                     (every field big-endian)
///  ┌──────────────────────────────────────────┐
///  │ 0   magic "QFI\xfb"      4  version      │   version 2 = compat 0.10, 3 = compat 1.1
///  │ 8   backing_file_offset  16 backing_size │
///  │ 20  cluster_bits         24 size         │   virtual size in bytes
///  │ 32  crypt_method         36 l1_size      │
///  │ 40  l1_table_offset      48 refcount_table_offset
///  │ 56  refcount_table_clusters  60 nb_snapshots  64 snapshots_offset
///  │ 72  incompatible_features (v3)           │   bit 0 dirty, 1 corrupt, 2 data file,
///  │ 80  compatible_features                  │   3 compression type, 4 extended L2
///  │ 88  autoclear_features  96 refcount_order  100 header_length
///  │ 104 compression_type (if header_length > 104)
///  ├──────────────────────────────────────────┤
///  │ header extensions: type u32, len u32,    │   backing format 0xe2792aca,
///  │   data padded to 8 bytes ... end (0)     │   feature names 0x6803f857, ...
///  │ backing file name (backing_file_size)    │
///  └──────────────────────────────────────────┘
///  refcount table → refcount blocks → refcount of every host cluster
///  L1 table → L2 tables → host cluster of every guest cluster
/// ```
package struct Qcow2Header: Equatable {
    static let magic: UInt32 = 0x5146_49fb
    static let v2Length = 72
    static let v3Length = 104

    package enum ExtensionType: UInt32 {
        case end = 0
        case backingFormat = 0xe279_2aca
        case featureNameTable = 0x6803_f857
        case bitmaps = 0x2385_2875
        case fullDiskEncryption = 0x0537_be77
        case externalDataFile = 0x4441_5441
    }

    struct Incompatible {
        static let dirty: UInt64 = 1 << 0
        static let corrupt: UInt64 = 1 << 1
        static let externalDataFile: UInt64 = 1 << 2
        static let compressionType: UInt64 = 1 << 3
        static let extendedL2: UInt64 = 1 << 4
        static let known: UInt64 = 0x1f
    }
    static let compatibleLazyRefcounts: UInt64 = 1 << 0
    package static let autoclearBitmaps: UInt64 = 1 << 0

    var version: UInt32 = 3
    var backingFileOffset: UInt64 = 0
    var backingFileSize: UInt32 = 0
    var clusterBits: UInt32 = 16
    package var size: UInt64 = 0
    var cryptMethod: UInt32 = 0
    var l1Size: UInt32 = 0
    var l1TableOffset: UInt64 = 0
    var refcountTableOffset: UInt64 = 0
    var refcountTableClusters: UInt32 = 0
    var nbSnapshots: UInt32 = 0
    var snapshotsOffset: UInt64 = 0
    var incompatibleFeatures: UInt64 = 0
    var compatibleFeatures: UInt64 = 0
    package var autoclearFeatures: UInt64 = 0
    var refcountOrder: UInt32 = 4
    var headerLength: UInt32 = 112
    var compressionType: UInt8 = 0
    /// Extensions other than backing format and feature names, preserved in order.
    package var otherExtensions: [(type: UInt32, data: [UInt8])] = []
    var backingFileName: String?
    var backingFormat: String?
    /// The feature name table, in its order: (type, bit, name).
    var featureNames: [(type: UInt8, bit: UInt8, name: String)] = []

    package static func == (a: Qcow2Header, b: Qcow2Header) -> Bool {
        a.encodeFixed() == b.encodeFixed() && a.backingFileName == b.backingFileName && a.backingFormat == b.backingFormat
    }

    var clusterSize: Int { 1 << Int(clusterBits) }
    var refcountBits: Int { 1 << Int(refcountOrder) }

    /// Parses and validates the header in `bytes` (the first cluster, or as much of it as the
    /// file has; what the file lacks reads as zeroes, as QEMU's reads past the end of a file).
    ///
    /// The checks and their messages follow QEMU's `qcow2_do_open` in its order, so that an
    /// image with several faults names the one QEMU names. Every field is untrusted: offsets
    /// and sizes are checked with arithmetic that cannot overflow before anything uses them.
    /// (QEMU's `check` skips the refcount and snapshot table checks; ours keeps them.)
    static func parse(_ raw: [UInt8], fileLength: Int64) throws -> Qcow2Header {
        func corrupt(_ m: String) -> BlockError { BlockError(.corrupt, m, operation: "read header") }
        guard raw.count >= v2Length else { throw corrupt("Image is not in qcow2 format (file too short)") }
        guard raw.be32(0) == magic else { throw corrupt("Image is not in qcow2 format") }
        var h = Qcow2Header()
        h.version = raw.be32(4)
        guard h.version == 2 || h.version == 3 else {
            throw BlockError(.unsupported, "Unsupported qcow2 version \(h.version)")
        }
        h.clusterBits = raw.be32(20)
        guard h.clusterBits >= 9 && h.clusterBits <= 21 else {
            throw BlockError(.corrupt, "Unsupported cluster size: 2^\(h.clusterBits)")
        }
        let cs = UInt64(1) << UInt64(h.clusterBits)
        var bytes = raw
        if bytes.count < Int(cs) { bytes.append(contentsOf: [UInt8](repeating: 0, count: Int(cs) - bytes.count)) }
        h.backingFileOffset = bytes.be64(8)
        h.backingFileSize = bytes.be32(16)
        h.size = bytes.be64(24)
        h.cryptMethod = bytes.be32(32)
        h.l1Size = bytes.be32(36)
        h.l1TableOffset = bytes.be64(40)
        h.refcountTableOffset = bytes.be64(48)
        h.refcountTableClusters = bytes.be32(56)
        h.nbSnapshots = bytes.be32(60)
        h.snapshotsOffset = bytes.be64(64)
        if h.version == 2 {
            h.refcountOrder = 4
            h.headerLength = UInt32(v2Length)
        } else {
            h.incompatibleFeatures = bytes.be64(72)
            h.compatibleFeatures = bytes.be64(80)
            h.autoclearFeatures = bytes.be64(88)
            h.refcountOrder = bytes.be32(96)
            h.headerLength = bytes.be32(100)
            guard h.headerLength >= UInt32(v3Length) else { throw corrupt("qcow2 header too short") }
        }
        guard UInt64(h.headerLength) <= cs else { throw corrupt("qcow2 header exceeds cluster size") }
        if h.backingFileOffset > cs { throw corrupt("Invalid backing file offset") }
        // Extensions lie between the fixed header and the backing file name (or the cluster's end).
        let extensionsEnd = h.backingFileOffset != 0 ? Int(h.backingFileOffset) : Int(cs)

        if h.headerLength > 104 { h.compressionType = bytes[104] }
        if h.compressionType > 1 {
            throw BlockError(.unsupported, "qcow2: unknown compression type: \(h.compressionType)")
        }
        let compressionBit = h.incompatibleFeatures & Incompatible.compressionType != 0
        if h.compressionType == 0 && compressionBit {
            throw corrupt("qcow2: Compression type incompatible feature bit must not be set")
        }
        if h.compressionType != 0 && !compressionBit {
            throw corrupt("qcow2: Compression type incompatible feature bit must be set")
        }

        let unknown = h.incompatibleFeatures & ~Incompatible.known
        if unknown != 0 {
            // As QEMU's report_unsupported_feature: the table's names of incompatible bits
            // that are set, in table order, then what remains of the mask in hex. (The
            // extensions are read for the names only; a fault in them is not reported.)
            _ = try? h.readExtensions(bytes, end: extensionsEnd)
            var names: [String] = []
            var rest = unknown
            for f in h.featureNames where f.type == 0 && f.bit < 64 && rest & (1 << UInt64(f.bit)) != 0 {
                names.append(f.name)
                rest &= ~(1 << UInt64(f.bit))
            }
            if rest != 0 { names.append("Unknown incompatible feature: " + String(rest, radix: 16)) }
            throw BlockError(.unsupported, "Unsupported qcow2 feature(s): " + names.joined(separator: ", "))
        }
        if h.incompatibleFeatures & Incompatible.externalDataFile != 0 {
            throw BlockError(.unsupported, "Unsupported qcow2 feature(s): External data file")
        }
        if h.incompatibleFeatures & Incompatible.extendedL2 != 0 {
            throw BlockError(.unsupported, "Unsupported qcow2 feature(s): Extended L2 entries")
        }
        guard h.refcountOrder <= 6 else {
            throw corrupt("Reference count entry width too large; may not exceed 64 bits")
        }
        if h.cryptMethod != 0 {
            throw BlockError(.unsupported, "Encrypted qcow2 images are not supported")
        }

        // Table sanity (QEMU's qcow2_validate_table: the entry count against the table's
        // limit, then the offset: cluster aligned, and the table's end within Int64).
        func validateTable(offset: UInt64, entries: UInt64, entrySize: UInt64, maxBytes: UInt64,
                           name: String) throws {
            if entries > maxBytes / entrySize { throw BlockError(.corrupt, "\(name) too large", errno: EFBIG) }
            if UInt64(Int64.max) - entries * entrySize < offset || offset % cs != 0 {
                throw BlockError(.corrupt, "\(name) offset invalid", errno: EINVAL)
            }
        }
        if h.refcountTableClusters == 0 {
            throw corrupt("Image does not contain a reference count table")
        }
        try validateTable(offset: h.refcountTableOffset, entries: UInt64(h.refcountTableClusters), entrySize: cs,
                          maxBytes: 8 << 20, name: "Reference count table")
        try validateTable(offset: h.snapshotsOffset, entries: UInt64(h.nbSnapshots), entrySize: 40,
                          maxBytes: 40 * 65536, name: "Snapshot table")
        try validateTable(offset: h.l1TableOffset, entries: UInt64(h.l1Size), entrySize: 8,
                          maxBytes: 32 << 20, name: "Active L1 table")
        // (Divided, not rounded up by addition, which a hostile size would overflow.)
        let span = cs * (cs / 8)
        let neededL1 = h.size / span + (h.size % span != 0 ? 1 : 0)
        // QEMU's qcow2_do_open: an L1 index past INT_MAX is refused before the table size.
        if neededL1 > UInt64(Int32.max) { throw BlockError(.invalidArgument, "Image is too big") }
        if UInt64(h.l1Size) < neededL1 { throw corrupt("L1 table is too small") }
        if h.size > UInt64(Int64.max) / 2 { throw corrupt("Image size too large") }
        // (QEMU reads tables past the end of the file as zeroes; we refuse them.)
        if h.l1Size > 0 && h.l1TableOffset >= UInt64(fileLength) {
            throw corrupt("L1 table offset \(h.l1TableOffset) points past the end of the file (\(fileLength) bytes)")
        }
        if h.refcountTableOffset == 0 { throw corrupt("Reference count table offset invalid") }
        if h.refcountTableOffset >= UInt64(fileLength) {
            throw corrupt("Reference count table offset \(h.refcountTableOffset) points past the end of the file (\(fileLength) bytes)")
        }

        try h.readExtensions(bytes, end: extensionsEnd)
        if h.backingFileOffset != 0 {
            let len = UInt64(h.backingFileSize)
            if len > min(1023, cs - h.backingFileOffset) { throw corrupt("Backing file name too long") }
            if len > 0 {
                let s = Int(h.backingFileOffset)
                h.backingFileName = String(decoding: bytes[s..<s + Int(len)], as: UTF8.self)
            }
        }
        return h
    }

    /// Reads the header extensions from the end of the fixed header up to `end` (QEMU's
    /// `qcow2_read_extensions`): the backing format, the feature name table and the others, kept.
    /// `bytes` holds at least `end` bytes.
    private mutating func readExtensions(_ bytes: [UInt8], end: Int) throws {
        var off = Int(headerLength)
        while off < end {
            guard off + 8 <= end else { throw BlockError(.corrupt, "Header extension too large", operation: "read header") }
            let type = bytes.be32(off)
            let len = Int(bytes.be32(off + 4))
            off += 8
            guard len <= end - off else { throw BlockError(.corrupt, "Header extension too large", operation: "read header") }
            if type == ExtensionType.end.rawValue { break }
            let data = Array(bytes[off..<off + len])
            switch ExtensionType(rawValue: type) {
            case .backingFormat:
                backingFormat = String(decoding: data.prefix { $0 != 0 }, as: UTF8.self)
            case .featureNameTable:
                // As QEMU reads it: zero-padded to whole 48-byte entries, up to the first
                // entry without a name.
                var i = 0
                while i + 2 < data.count && data[i + 2] != 0 {
                    let entry = data[i..<min(i + 48, data.count)]
                    let name = String(decoding: entry.dropFirst(2).prefix { $0 != 0 }, as: UTF8.self)
                    featureNames.append((type: data[i], bit: data[i + 1], name: name))
                    i += 48
                }
            default:
                otherExtensions.append((type, data))
            }
            off += (len + 7) & ~7
        }
    }

    /// The fixed part (72 or 112 bytes).
    func encodeFixed() -> [UInt8] {
        var b: [UInt8] = []
        b.reserveCapacity(112)
        b.appendBE32(Qcow2Header.magic)
        b.appendBE32(version)
        b.appendBE64(backingFileOffset)
        b.appendBE32(backingFileSize)
        b.appendBE32(clusterBits)
        b.appendBE64(size)
        b.appendBE32(cryptMethod)
        b.appendBE32(l1Size)
        b.appendBE64(l1TableOffset)
        b.appendBE64(refcountTableOffset)
        b.appendBE32(refcountTableClusters)
        b.appendBE32(nbSnapshots)
        b.appendBE64(snapshotsOffset)
        if version >= 3 {
            b.appendBE64(incompatibleFeatures)
            b.appendBE64(compatibleFeatures)
            b.appendBE64(autoclearFeatures)
            b.appendBE32(refcountOrder)
            b.appendBE32(headerLength)
            if headerLength > 104 {
                b.append(compressionType)
                b.append(contentsOf: [UInt8](repeating: 0, count: Int(headerLength) - 105))
            }
        }
        return b
    }

    static let featureTable: [(type: UInt8, bit: UInt8, name: String)] = [
        (0, 0, "dirty bit"), (0, 1, "corrupt bit"), (0, 2, "external data file"),
        (0, 3, "compression type"), (0, 4, "extended L2 entries"),
        (1, 0, "lazy refcounts"), (2, 0, "bitmaps"), (2, 1, "raw external data"),
    ]

    /// The whole header cluster: fixed part, extensions, end marker, backing file name.
    /// Sets `backingFileOffset`/`backingFileSize` to where the name lands.
    /// - Throws: `.invalidArgument` if it does not fit in one cluster.
    mutating func encode() throws -> [UInt8] {
        var ext: [UInt8] = []
        func add(_ type: UInt32, _ data: [UInt8]) {
            ext.appendBE32(type)
            ext.appendBE32(UInt32(data.count))
            ext.append(contentsOf: data)
            ext.append(contentsOf: [UInt8](repeating: 0, count: (8 - data.count % 8) % 8))
        }
        if let f = backingFormat { add(ExtensionType.backingFormat.rawValue, Array(f.utf8)) }
        // The feature name table is optional. QEMU leaves it out for clusters of 4 KiB and
        // less (it would crowd out a backing file name there); we also leave it out when it
        // does not fit.
        let fixedSize = version >= 3 ? Int(headerLength) : Qcow2Header.v2Length
        let others = otherExtensions.reduce(0) { $0 + 8 + ($1.data.count + 7) / 8 * 8 }
        let nameSize = backingFileName?.utf8.count ?? 0
        let tableSize = 8 + Qcow2Header.featureTable.count * 48
        if version >= 3 && clusterSize > 4096 && fixedSize + ext.count + tableSize + others + 8 + nameSize <= clusterSize {
            var t: [UInt8] = []
            for f in Qcow2Header.featureTable {
                t.append(f.type)
                t.append(f.bit)
                var name = Array(f.name.utf8)
                name.append(contentsOf: [UInt8](repeating: 0, count: 46 - name.count))
                t.append(contentsOf: name)
            }
            add(ExtensionType.featureNameTable.rawValue, t)
        }
        for e in otherExtensions { add(e.type, e.data) }
        ext.appendBE32(0)
        ext.appendBE32(0)
        let fixedLen = version >= 3 ? Int(headerLength) : Qcow2Header.v2Length
        let name = backingFileName.map { Array($0.utf8) } ?? []
        if let _ = backingFileName {
            backingFileOffset = UInt64(fixedLen + ext.count)
            backingFileSize = UInt32(name.count)
        } else {
            backingFileOffset = 0
            backingFileSize = 0
        }
        var out = encodeFixed()
        out.append(contentsOf: ext)
        out.append(contentsOf: name)
        if out.count > clusterSize || name.count > 1023 {
            throw BlockError(.invalidArgument, "Header extensions and backing file name do not fit in the first cluster")
        }
        return out
    }
}
