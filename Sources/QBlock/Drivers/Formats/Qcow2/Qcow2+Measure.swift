import QBlockBitmaps
import QBlockCore
import QBlockGraph
/// `qemu-img measure` for qcow2 (QEMU's `qcow2_measure`): metadata of a fully allocated
/// image of the virtual size, plus the clusters the source's data needs, plus its
/// persistent bitmaps.
extension Qcow2Format: Measurable {
    /// Creation features this library cannot create images with, but whose size QEMU's
    /// measure computes all the same (they change nothing in the result).
    public static let measureOnlyOptions = ["data_file", "data_file_raw", "encryption", "encrypt.format"]

    /// How much space a qcow2 image with create options `values` needs (`qemu-img measure`):
    /// without `source`, for an empty image of option `size`; with it, for a copy of its
    /// allocated data.
    /// - Returns: the bytes required now and fully allocated, as QEMU computes them.
    /// - Throws: ``BlockError`` `.invalidArgument` for an invalid option (QEMU's message).
    public static func measure(options values: [String: String], source: MeasureSource?) async throws -> MeasureResult {
        let extendedL2 = values["extended_l2"].flatMap(CreateOption.parseBool) ?? false
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
            let ssize = source.length
            virtualSize = roundUp(ssize, clusterSize)
            if hasBacking {
                required = virtualSize
            } else {
                var offset: Int64 = 0
                while offset < ssize {
                    let e = try await source.run(offset, ssize - offset)
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
        if version >= 3, let source, let store = source.node as? any PersistentBitmapStore {
            bitmaps = bitmapsSize(store.persistentBitmaps.all.filter(\.isPersistent), virtualSize: source.node.length,
                                  clusterSize: clusterSize)
        }
        return MeasureResult(required: fully - virtualSize + required, fullyAllocated: fully, bitmaps: bitmaps)
    }

    /// QEMU's `qcow2_measure_bitmaps`: the space `bitmaps` would take in a new image of
    /// `clusterSize` (each bitmap's data fully allocated, its table, and the directory).
    static func bitmapsSize(_ bitmaps: [DirtyBitmap], virtualSize: Int64, clusterSize: Int64) -> Int64 {
        var total: Int64 = 0
        var dirBytes: Int64 = 0
        for b in bitmaps {
            let bits = (virtualSize + b.granularity - 1) / b.granularity
            let bytes = (bits + 7) / 8
            let clusters = (bytes + clusterSize - 1) / clusterSize
            total += clusters * clusterSize
            total += roundUp(clusters * 8, clusterSize)
            dirBytes += Int64((24 + b.name.utf8.count + 7) / 8 * 8)
        }
        return total + roundUp(dirBytes, clusterSize)
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
