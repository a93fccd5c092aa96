import QBlockBitmaps
import QBlockCore
import QBlockDrivers
import QBlockGraph
import QBlockOperations
/// `query-named-block-nodes`: QEMU's `BlockDeviceInfo` for a node.
extension QMPBlockState {
    func deviceInfo(_ node: BlockNode, flat: Bool) -> QObject {
        let info = nodeInfo(node)
        var d = QObject.Dict()
        d["file"] = .string(node.filename)
        d["node-name"] = .string(node.nodeName)
        d["ro"] = .bool(node.isReadOnly || isReportedReadOnly(node))
        d["drv"] = .string(node.driverName)
        if let b = node.backing { d["backing_file"] = .string(b.filename) }
        var depth = 0
        if !flat { var c = node.backing; while let b = c { depth += 1; c = b.backing } }
        d["backing_file_depth"] = .int(Int64(depth))
        d["encrypted"] = .bool(false)
        d["detect_zeroes"] = .string(info?.detectZeroes ?? "off")
        for k in ["bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr"] { d[k] = .int(0) }
        d["image"] = Self.imageInfo(node, flat: flat)
        let cache = info?.cache ?? .writeback
        d["cache"] = .dict(QObject.Dict([("writeback", .bool(!cache.writeThrough)), ("direct", .bool(cache.direct)),
                                         ("no-flush", .bool(info?.noFlush ?? false))]))
        d["write_threshold"] = .int(Int64(bitPattern: node.watch.writeThreshold))
        let bitmaps = orderedBitmaps(node)
        if !bitmaps.isEmpty { d["dirty-bitmaps"] = .list(bitmaps.map(Self.dirtyInfo)) }
        return .dict(d)
    }

    /// QEMU's `BlockDirtyInfo`.
    static func dirtyInfo(_ b: DirtyBitmap) -> QObject {
        var d = QObject.Dict()
        d["name"] = .string(b.name)
        d["count"] = .int(b.dirtyBytes)
        d["granularity"] = .int(b.granularity)
        d["recording"] = .bool(b.isEnabled)
        d["busy"] = .bool(b.isBusy)
        d["persistent"] = .bool(b.isPersistent)
        if b.isInconsistent { d["inconsistent"] = .bool(true) }
        return .dict(d)
    }

    /// `ImageInfo` of a node as QEMU's `bdrv_query_image_info` reports it (with
    /// `backing-image` unless flat).
    static func imageInfo(_ node: any BlockDriver, flat: Bool) -> QObject {
        let inner = node.innermostDriver
        var info = ImageInfo(node: inner)
        if let f = inner.file?.innermostDriver as? any HostStorage {
            info.actualSize = f.allocatedSize
            info.hasDirtyFlag = true
        } else if let f = inner as? any HostStorage {
            info.actualSize = f.allocatedSize
        } else if inner.file?.innermostDriver is any NetworkStorage || inner is any NetworkStorage {
            info.hasDirtyFlag = false
        }
        guard case .dict(var d) = info.qobject else { return info.qobject }
        if !flat, let b = node.backing { d["backing-image"] = imageInfo(b, flat: false) }
        return .dict(d)
    }
}
