import QBlockCore
/// Persistent dirty bitmaps in qcow2: the on-disk structures (QEMU's `docs/interop/qcow2.txt`,
/// "Bitmaps extension", "Bitmap directory", "Bitmap table", "Bitmaps").
///
/// ```
///  header extension 0x23852875 (24 bytes)      autoclear feature bit 0 says it is valid
///  ┌ nb_bitmaps u32 │ reserved u32 │ directory_size u64 │ directory_offset u64 ┐
///                                                │
///  bitmap directory (clusters, entries padded to 8 bytes)  ◄─────────────────────┘
///  ┌ table_offset u64 │ table_size u32 │ flags u32 │ type u8 │ granularity_bits u8
///  │ name_size u16 │ extra_data_size u32 │ extra data │ name │ padding ┐  × nb_bitmaps
///        │                                flags: 0 in_use, 1 auto, 2 extra_data_compatible
///        ▼
///  bitmap table: table_size u64 entries, one per cluster of bitmap data:
///    bits 9-55 the data cluster's offset; 0 with bit 0 clear: all zeros, bit 0 set: all ones
///        ▼
///  bitmap data cluster: bit j of byte k is the chunk (k*8 + j) of the cluster's range,
///    a chunk being 2^granularity_bits bytes of the disk
/// ```
///
/// Validation follows QEMU 7.2 (`block/qcow2-bitmap.c`) and uses its messages. One
/// departure: QEMU refuses any extra data; as the specification asks, an entry with extra
/// data is kept untouched (extra data included) and its bitmap is loaded only when the
/// `extra_data_compatible` flag is set — otherwise it is listed but cannot be used.
struct Qcow2BitmapsExtension: Equatable {
    static let size = 24
    /// QEMU's limits: at most 65535 bitmaps, a directory of at most 64 MiB.
    static let maxBitmaps: UInt32 = 65535
    static let maxDirectorySize: UInt64 = 1024 * 65535

    var count: UInt32
    var directorySize: UInt64
    var directoryOffset: UInt64

    /// Parses the extension data with QEMU's checks (`qcow2_read_extensions`).
    static func parse(_ d: [UInt8], clusterSize: Int) throws -> Qcow2BitmapsExtension {
        func bad(_ m: String) -> BlockError { BlockError(.corrupt, m, operation: "read bitmaps extension") }
        guard d.count == size else { throw bad("bitmaps_ext: Invalid extension length") }
        guard d.be32(4) == 0 else { throw bad("bitmaps_ext: Reserved field is not zero") }
        let e = Qcow2BitmapsExtension(count: d.be32(0), directorySize: d.be64(8), directoryOffset: d.be64(16))
        if e.count > maxBitmaps {
            throw bad("bitmaps_ext: Image has \(e.count) bitmaps, exceeding the QEMU supported maximum of \(maxBitmaps)")
        }
        if e.count == 0 { throw bad("found bitmaps extension with zero bitmaps") }
        if e.directoryOffset % UInt64(clusterSize) != 0 { throw bad("bitmaps_ext: invalid bitmap directory offset") }
        if e.directorySize > maxDirectorySize {
            throw bad("bitmaps_ext: bitmap directory size (\(e.directorySize)) exceeds the maximum supported size (\(maxDirectorySize))")
        }
        return e
    }

    func encoded() -> [UInt8] {
        var b: [UInt8] = []
        b.appendBE32(count)
        b.appendBE32(0)
        b.appendBE64(directorySize)
        b.appendBE64(directoryOffset)
        return b
    }
}

/// Flags of a bitmap directory entry.
public struct Qcow2BitmapFlags: OptionSet, Sendable, Hashable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    /// The bitmap was not saved after changes: its content cannot be trusted.
    public static let inUse = Qcow2BitmapFlags(rawValue: 1 << 0)
    /// Writes mark the bitmap (an enabled bitmap).
    public static let auto = Qcow2BitmapFlags(rawValue: 1 << 1)
    /// Unknown extra data may be ignored.
    public static let extraDataCompatible = Qcow2BitmapFlags(rawValue: 1 << 2)
    static let reserved: UInt32 = ~0x7
}

/// What `qemu-img info` lists for one bitmap (`Qcow2BitmapInfo`): flags as on disk.
public struct Qcow2BitmapInfo: Sendable, Equatable {
    /// The bitmap's name (unique within the image).
    public var name: String
    /// Bytes of guest data per bit (a power of two, at least 512).
    public var granularity: Int64
    /// The flags stored in the bitmap directory entry (`in-use`, `auto`, ...).
    public var flags: Qcow2BitmapFlags

    /// The QAPI object `qemu-img info` prints: flags ("in-use", "auto"), name, granularity.
    public var qobject: QObject {
        var f: [QObject] = []
        if flags.contains(.inUse) { f.append(.string("in-use")) }
        if flags.contains(.auto) { f.append(.string("auto")) }
        return .dict(QObject.Dict([("flags", .list(f)), ("name", .string(name)), ("granularity", .int(granularity))]))
    }
}

/// One bitmap directory entry.
struct Qcow2BitmapEntry: Equatable {
    static let dirtyTrackingType: UInt8 = 1
    static let minGranularityBits: UInt8 = 9
    static let maxGranularityBits: UInt8 = 31
    static let maxNameSize = 1023
    static let maxTableSize: UInt32 = 0x800_0000
    static let maxPhysSize: UInt64 = 0x2000_0000
    /// Bitmap table entries: reserved bits, the offset field, the all-ones flag.
    static let tableReservedMask: UInt64 = 0xff00_0000_0000_01fe
    static let tableOffsetMask: UInt64 = 0x00ff_ffff_ffff_fe00
    static let tableAllOnes: UInt64 = 1

    var tableOffset: UInt64 = 0
    var tableSize: UInt32 = 0
    var flags: Qcow2BitmapFlags = []
    var type: UInt8 = dirtyTrackingType
    var granularityBits: UInt8
    var name: [UInt8]
    var extraData: [UInt8] = []

    var nameString: String { String(decoding: name, as: UTF8.self) }
    var granularity: Int64 { Int64(1) << Int64(granularityBits) }
    /// Bytes of this entry in the directory (header, extra data, name, padding to 8).
    var encodedSize: Int { (24 + extraData.count + name.count + 7) & ~7 }
    /// Whether the bitmap's bits may be used: no extra data, or extra data marked compatible.
    var usable: Bool { extraData.isEmpty || flags.contains(.extraDataCompatible) }
    var info: Qcow2BitmapInfo {
        Qcow2BitmapInfo(name: nameString, granularity: granularity, flags: Qcow2BitmapFlags(rawValue: flags.rawValue & 0x3))
    }

    /// Entries of bitmap table a bitmap of `size` bytes needs: one per cluster of bits.
    static func tableSize(diskSize: Int64, granularity: Int64, clusterSize: Int) -> Int64 {
        let bits = (diskSize + granularity - 1) / granularity
        let bytes = (bits + 7) / 8
        return (bytes + Int64(clusterSize) - 1) / Int64(clusterSize)
    }

    /// QEMU's `check_dir_entry`.
    func satisfiesConstraints(diskSize: Int64, clusterSize: Int) -> Bool {
        if tableSize == 0 || tableOffset == 0 || tableOffset % UInt64(clusterSize) != 0 || tableSize > Self.maxTableSize
            || granularityBits > Self.maxGranularityBits || granularityBits < Self.minGranularityBits
            || flags.rawValue & Qcow2BitmapFlags.reserved != 0 || name.count > Self.maxNameSize
            || type != Self.dirtyTrackingType {
            return false
        }
        let phys = UInt64(tableSize) * UInt64(clusterSize)
        if phys > Self.maxPhysSize { return false }
        if !flags.contains(.inUse) && UInt64(diskSize) > (phys * 8) << UInt64(granularityBits) { return false }
        return true
    }

    /// Parses a whole directory (QEMU's `bitmap_list_load`).
    /// - Throws: `.corrupt` with QEMU's message.
    static func parseDirectory(_ dir: [UInt8], count: UInt32, diskSize: Int64, clusterSize: Int) throws -> [Qcow2BitmapEntry] {
        func bad(_ m: String) -> BlockError { BlockError(.corrupt, m, operation: "read bitmap directory") }
        var list: [Qcow2BitmapEntry] = []
        var p = 0
        while p < dir.count {
            guard p + 24 <= dir.count else { throw bad("Broken bitmap directory") }
            if list.count + 1 > Int(count) { throw bad("More bitmaps found than specified in header extension") }
            let nameSize = Int(UInt16(dir[p + 18]) << 8 | UInt16(dir[p + 19]))
            let extraSize = Int(dir.be32(p + 20))
            let size = (24 + extraSize + nameSize + 7) & ~7
            guard extraSize <= dir.count, size <= dir.count - p else { throw bad("Broken bitmap directory") }
            let nameStart = p + 24 + extraSize
            var e = Qcow2BitmapEntry(tableOffset: dir.be64(p), tableSize: dir.be32(p + 8),
                                     flags: Qcow2BitmapFlags(rawValue: dir.be32(p + 12)), type: dir[p + 16],
                                     granularityBits: dir[p + 17], name: Array(dir[nameStart..<nameStart + nameSize]))
            e.extraData = Array(dir[(p + 24)..<nameStart])
            guard e.satisfiesConstraints(diskSize: diskSize, clusterSize: clusterSize) else {
                throw bad("Bitmap '\(e.nameString)' doesn't satisfy the constraints")
            }
            list.append(e)
            p += size
        }
        if list.count != Int(count) { throw bad("Less bitmaps found than specified in header extension") }
        return list
    }

    /// The directory bytes for `list`.
    static func encodeDirectory(_ list: [Qcow2BitmapEntry]) -> [UInt8] {
        var b: [UInt8] = []
        for e in list {
            b.appendBE64(e.tableOffset)
            b.appendBE32(e.tableSize)
            b.appendBE32(e.flags.rawValue)
            b.append(e.type)
            b.append(e.granularityBits)
            b.appendBE16(UInt16(e.name.count))
            b.appendBE32(UInt32(e.extraData.count))
            b.append(contentsOf: e.extraData)
            b.append(contentsOf: e.name)
            b.append(contentsOf: [UInt8](repeating: 0, count: (8 - b.count % 8) % 8))
        }
        return b
    }

    /// QEMU's `check_table_entry`.
    static func tableEntryValid(_ e: UInt64, clusterSize: Int) -> Bool {
        if e & tableReservedMask != 0 { return false }
        let off = e & tableOffsetMask
        if off != 0 && (e & tableAllOnes != 0 || off % UInt64(clusterSize) != 0) { return false }
        return true
    }
}

extension Qcow2Header {
    /// The bitmaps extension, if present (whatever the autoclear bit says).
    func bitmapsExtensionData() -> [UInt8]? {
        otherExtensions.first { $0.type == ExtensionType.bitmaps.rawValue }?.data
    }

    /// Sets or removes the bitmaps extension. QEMU writes it right after the feature name
    /// table, before extensions it does not know.
    mutating func setBitmapsExtension(_ e: Qcow2BitmapsExtension?) {
        otherExtensions.removeAll { $0.type == ExtensionType.bitmaps.rawValue }
        if let e { otherExtensions.insert((ExtensionType.bitmaps.rawValue, e.encoded()), at: 0) }
    }
}
