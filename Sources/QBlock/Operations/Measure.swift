import QBlockCore
import QBlockDrivers
import QBlockGraph
/// What `qemu-img measure` reports: the file size a new image needs.
public struct MeasureResult: Sendable, Equatable {
    /// Bytes needed for the image as converted (metadata for a fully allocated image, plus
    /// the data clusters the source really uses).
    public var required: Int64
    /// Bytes of the image fully allocated.
    public var fullyAllocated: Int64
    /// Bytes for persistent bitmaps, when qemu-img shows them (qcow2 v3 output of a source
    /// that can hold bitmaps).
    public var bitmaps: Int64?

    /// `qemu-img measure --output=json`.
    public var json: String {
        var d = QObject.Dict()
        d["required"] = .int(required)
        d["fully-allocated"] = .int(fullyAllocated)
        if let bitmaps { d["bitmaps"] = .int(bitmaps) }
        return QObject.dict(d).prettyJSON + "\n"
    }

    /// `qemu-img measure` human output.
    public var human: String {
        var s = "required size: \(required)\nfully allocated size: \(fullyAllocated)\n"
        if let bitmaps { s += "bitmaps size: \(bitmaps)\n" }
        return s
    }
}

/// `qemu-img measure`: QEMU's `qcow2_measure` and `raw_measure`.
public enum Measure {
    /// Options accepted with `-o` besides the format's creation options (the file protocol's).
    static let protocolOptions = ["nocow", "extent_size_hint"]
    /// qcow2 creation options this library cannot create with but QEMU's measure accepts.
    static let extraQcow2Options = ["data_file", "data_file_raw", "encryption", "encrypt.format"]

    /// Measures a new image of `format` with creation `options`, either of `size` bytes or
    /// converted from `source`.
    /// - Throws: ``BlockError`` with qemu-img's message (an invalid option is reported with a
    ///   second line "Invalid options for file format '...'").
    public static func measure(format: String, options: [(String, String)], size: Int64?,
                               source: (any BlockDriver)?) async throws -> MeasureResult {
        guard let table = ImageCreator.optionTable[format] else {
            throw BlockError(.invalidArgument, "Unknown file format '\(format)'")
        }
        var values: [String: String] = [:]
        for (k, v) in options {
            let known = table.contains { $0.name == k } || protocolOptions.contains(k)
                || (format == "qcow2" && extraQcow2Options.contains(k))
            guard known else {
                throw BlockError(.invalidArgument, "Invalid parameter '\(k)'\nInvalid options for file format '\(format)'")
            }
            if let desc = table.first(where: { $0.name == k }), desc.type == .size {
                guard let n = SizeParser.parse(v) else {
                    throw BlockError(.invalidArgument, "Parameter '\(k)' expects a non-negative number below 2^64\n"
                        + ImageCreator.sizeHint + "\nInvalid options for file format '\(format)'")
                }
                values[k] = String(n)
            } else {
                values[k] = v
            }
        }
        if let size { values["size"] = String(size) }
        switch format {
        case "raw":
            let required: Int64
            if let source {
                required = qemuLength(source)
            } else {
                required = Int64(values["size"] ?? "0") ?? 0
            }
            return MeasureResult(required: (required + 511) / 512 * 512, fullyAllocated: (required + 511) / 512 * 512)
        default:
            return try await measureQcow2(values, source: source)
        }
    }

    private static func measureQcow2(_ values: [String: String], source: (any BlockDriver)?) async throws -> MeasureResult {
        let extendedL2 = values["extended_l2"].flatMap(ImageCreator.parseBool) ?? false
        var clusterSize: Int64 = 65536
        if let v = values["cluster_size"] {
            guard let c = Int64(v), c >= 512, c <= 2 << 20, c & (c - 1) == 0 else {
                throw BlockError(.invalidArgument, "Cluster size must be a power of two between 512 and 2048k")
            }
            clusterSize = c
        }
        if extendedL2 && clusterSize < 16384 {
            throw BlockError(.invalidArgument, "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes")
        }
        var version = 3
        if let v = values["compat"] {
            switch v {
            case "0.10", "v2": version = 2
            case "1.1", "v3": version = 3
            default: throw BlockError(.invalidArgument, "Invalid compatibility level: '\(v)'")
            }
        }
        var refcountBits: Int64 = 16
        if let v = values["refcount_bits"] {
            guard let r = Int64(v), r > 0, r <= 64, r & (r - 1) == 0 else {
                throw BlockError(.invalidArgument, "Refcount width must be a power of two and may not exceed 64 bits")
            }
            if version < 3 && r != 16 {
                throw BlockError(.invalidArgument, "Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)")
            }
            refcountBits = r
        }
        var prealloc = Preallocation.off
        if let v = values["preallocation"] {
            guard let p = Preallocation(rawValue: v) else {
                throw BlockError(.invalidArgument, "Parameter 'preallocation' does not accept value '\(v)'")
            }
            prealloc = p
        }
        let hasBacking = values["backing_file"] != nil
        let l2eSize: Int64 = extendedL2 ? 16 : 8
        var virtualSize = roundUp(Int64(values["size"] ?? "0") ?? 0, clusterSize)
        let l2Tables = (virtualSize / clusterSize + clusterSize / l2eSize - 1) / (clusterSize / l2eSize)
        if l2Tables * 8 > 32 << 20 {
            throw BlockError(.invalidArgument, "The image size is too large (try using a larger cluster size)")
        }
        var required: Int64 = 0
        if let source {
            let ssize = qemuLength(source)
            virtualSize = roundUp(ssize, clusterSize)
            if hasBacking {
                required = virtualSize
            } else {
                var offset: Int64 = 0
                while offset < ssize {
                    let e = try await BlockMap.status(of: source, at: offset, length: ssize - offset)
                    var pnum = e.length
                    if e.zero {
                        // Zero regions need no clusters (safe without a backing file).
                    } else if e.data && e.present {
                        pnum = roundUp(offset + pnum, clusterSize) - offset
                        required += offset % clusterSize + pnum
                    }
                    offset += pnum
                }
            }
        }
        if prealloc == .full || prealloc == .falloc { required = virtualSize }
        let fully = preallocSize(virtualSize, clusterSize: clusterSize, refcountOrder: Int64(refcountBits.trailingZeroBitCount),
                                 l2eSize: l2eSize)
        var bitmaps: Int64?
        if version >= 3, let q = source as? Qcow2Node {
            bitmaps = try await q.persistentBitmapsSize(clusterSize: clusterSize)
        }
        return MeasureResult(required: fully - virtualSize + required, fullyAllocated: fully, bitmaps: bitmaps)
    }

    static func roundUp(_ v: Int64, _ a: Int64) -> Int64 { (v + a - 1) / a * a }

    /// QEMU's `qcow2_calc_prealloc_size`.
    static func preallocSize(_ totalSize: Int64, clusterSize: Int64, refcountOrder: Int64, l2eSize: Int64) -> Int64 {
        let aligned = roundUp(totalSize, clusterSize)
        var meta = clusterSize
        var nl2e = aligned / clusterSize
        nl2e = roundUp(nl2e, clusterSize / l2eSize)
        meta += nl2e * l2eSize
        var nl1e = nl2e * l2eSize / clusterSize
        nl1e = roundUp(nl1e, clusterSize / 8)
        meta += nl1e * 8
        meta += refcountMetadataSize(clusters: (meta + aligned) / clusterSize, clusterSize: clusterSize,
                                     refcountOrder: refcountOrder)
        return meta + aligned
    }

    /// QEMU's `qcow2_refcount_metadata_size` (without the generous increase).
    static func refcountMetadataSize(clusters: Int64, clusterSize: Int64, refcountOrder: Int64) -> Int64 {
        let blocksPerTableCluster = clusterSize / 8
        let refcountsPerBlock = clusterSize * 8 / (1 << refcountOrder)
        var table: Int64 = 0, blocks: Int64 = 0, n: Int64 = 0, last: Int64
        repeat {
            last = n
            blocks = (clusters + table + blocks + refcountsPerBlock - 1) / refcountsPerBlock
            table = (blocks + blocksPerTableCluster - 1) / blocksPerTableCluster
            n = clusters + blocks + table
        } while n != last
        return (blocks + table) * clusterSize
    }
}

extension Qcow2Node {
    /// QEMU's `qcow2_measure_bitmaps`: the space the image's persistent dirty bitmaps would
    /// take in a new image of `clusterSize` (each bitmap fully allocated, its table, and the
    /// bitmap directory), read from the bitmaps header extension and directory.
    func persistentBitmapsSize(clusterSize: Int64) async throws -> Int64 {
        // QEMU ignores the bitmaps when the autoclear bit says they are not trustworthy.
        guard header.autoclearFeatures & Qcow2Header.autoclearBitmaps != 0,
              let ext = header.otherExtensions.first(where: { $0.type == Qcow2Header.ExtensionType.bitmaps.rawValue }),
              ext.data.count >= 24 else { return 0 }
        let count = Int(ext.data.be32(0))
        let dirSize = Int(ext.data.be64(8))
        let dirOffset = Int64(ext.data.be64(16))
        guard count > 0, dirSize > 0, dirSize <= 64 << 20 else { return 0 }
        let dir = try await hostFile.read(at: dirOffset, count: dirSize)
        var total: Int64 = 0
        var dirBytes: Int64 = 0
        var pos = 0
        let virtualSize = Int64(header.size)
        for _ in 0..<count {
            guard pos + 24 <= dir.count else {
                throw BlockError(.corrupt, "Bitmap directory is truncated", path: filename, operation: "measure")
            }
            let granularityBits = Int(dir[pos + 17])
            let nameSize = Int(dir[pos + 18]) << 8 | Int(dir[pos + 19])
            let extraSize = Int(dir.be32(pos + 20))
            guard granularityBits < 64 else {
                throw BlockError(.corrupt, "Bitmap granularity is invalid", path: filename, operation: "measure")
            }
            let granularity = Int64(1) << Int64(granularityBits)
            let bits = (virtualSize + granularity - 1) / granularity
            let bytes = (bits + 7) / 8
            let clusters = (bytes + clusterSize - 1) / clusterSize
            total += clusters * clusterSize
            total += Measure.roundUp(clusters * 8, clusterSize)
            let entrySize = (24 + nameSize + extraSize + 7) / 8 * 8
            dirBytes += Int64((24 + nameSize + 7) / 8 * 8)
            pos += entrySize
        }
        return total + Measure.roundUp(dirBytes, clusterSize)
    }
}
