import QBlockCore
import QBlockDrivers
import QBlockGraph
import QBlockOpen
/// What `qemu-img info` reports about one image (QAPI's `ImageInfo`). The tools render it
/// as qemu-img prints it; the monitor reports it through ``qobject`` (`query-block`).
public struct ImageInfo: Sendable, Equatable {
    /// The image's file name (or NBD URI).
    public var filename: String
    /// The image's format name.
    public var format: String
    /// Virtual size in bytes (in whole sectors, as QEMU reports it).
    public var virtualSize: Int64
    /// Bytes the image occupies on the host, if known.
    public var actualSize: Int64?
    /// Bytes per allocation unit, for formats that have clusters.
    public var clusterSize: Int?
    /// The image was not closed cleanly (qcow2's dirty bit; `dirty-flag`).
    public var dirty: Bool
    /// Whether the node can report block-driver information at all; QEMU omits `dirty-flag`
    /// when it cannot (raw over a protocol without `bdrv_get_info`, such as nbd).
    public var hasDirtyFlag = true
    /// The backing file name as stored in the image.
    public var backingFilename: String?
    /// The backing file name resolved against the image's directory.
    public var fullBackingFilename: String?
    /// The backing file's format as stored in the image, if any.
    public var backingFormat: String?
    /// `{"type": ..., "data": {...}}` for formats that have format-specific information.
    public var formatSpecific: QObject.Dict?
    /// Internal snapshots; nil when there are none, as QEMU leaves the key out.
    public var snapshots: [SnapshotInfo]?

    /// Creates an info value; every parameter is the property of the same name.
    public init(filename: String, format: String, virtualSize: Int64, actualSize: Int64? = nil,
                clusterSize: Int? = nil, dirty: Bool = false, backingFilename: String? = nil,
                fullBackingFilename: String? = nil, backingFormat: String? = nil, formatSpecific: QObject.Dict? = nil) {
        self.filename = filename
        self.format = format
        self.virtualSize = virtualSize
        self.actualSize = actualSize
        self.clusterSize = clusterSize
        self.dirty = dirty
        self.backingFilename = backingFilename
        self.fullBackingFilename = fullBackingFilename
        self.backingFormat = backingFormat
        self.formatSpecific = formatSpecific
    }

    /// Collects the information of an open node (its backing node is not looked at).
    public init(node wrapped: any BlockDriver) {
        // (Graph wrappers — nodes opened through the monitor's machinery — are looked through.)
        let node = wrapped.innermostDriver
        filename = node.filename
        format = node.driverName
        virtualSize = qemuLength(node)
        if let f = (node.file?.skippingFilters.innermostDriver as? any HostStorage) ?? (node as? any HostStorage) {
            actualSize = f.allocatedSize
        }
        dirty = false
        // A pass-through format has driver information only when its file has (QEMU's raw_get_info).
        if node is any PassThroughFormat, let f = node.file, !(f is any HostStorage) { hasDirtyFlag = false }
        if let r = node as? any FormatInfoReporting {
            let i = r.driverInfo
            clusterSize = i.clusterSize
            dirty = i.isDirty
            formatSpecific = r.formatSpecificInfo
        }
        if let b = node as? any BackingLinked {
            backingFilename = b.backingFileName
            if let name = b.backingFileName {
                fullBackingFilename = ImageOpener.resolveBackingPath(name, relativeTo: b.filename)
            }
            backingFormat = b.backingFormat
        }
        if let s = node as? any InternalSnapshotting {
            let list = s.internalSnapshots
            snapshots = list.isEmpty ? nil : list
        }
    }

    /// The QAPI `ImageInfo` object.
    public var qobject: QObject {
        var d = QObject.Dict()
        d["filename"] = .string(filename)
        d["format"] = .string(format)
        if hasDirtyFlag { d["dirty-flag"] = .bool(dirty) }
        if let actualSize { d["actual-size"] = .int(actualSize) }
        d["virtual-size"] = .int(virtualSize)
        if let clusterSize { d["cluster-size"] = .int(Int64(clusterSize)) }
        if let backingFilename { d["backing-filename"] = .string(backingFilename) }
        if let fullBackingFilename { d["full-backing-filename"] = .string(fullBackingFilename) }
        if let backingFormat { d["backing-filename-format"] = .string(backingFormat) }
        if let snapshots { d["snapshots"] = .list(snapshots.map(\.qobject)) }
        if let formatSpecific { d["format-specific"] = .dict(formatSpecific) }
        return .dict(d)
    }

    /// Opens `filename` without its backing file and collects its information.
    public static func collect(_ filename: String, options: OpenOptions) async throws -> ImageInfo {
        var o = options
        o.readOnly = true
        o.openBacking = false
        let node = try await ImageOpener.open(filename, options: o)
        let info = ImageInfo(node: node)
        try? await node.close()
        return info
    }

    /// Information on `filename` and, when `backingChain` is set, on every image below it,
    /// each opened by itself as qemu-img does (a missing backing file fails only then).
    public static func collectChain(_ filename: String, options: OpenOptions, backingChain: Bool) async throws -> [ImageInfo] {
        var infos: [ImageInfo] = []
        var name = filename
        var o = options
        var seen = Set<String>()
        while true {
            if !seen.insert(name).inserted {
                throw BlockError(.invalidArgument, "Backing file '\(name)' creates an infinite loop.", path: name, operation: "info")
            }
            let info = try await collect(name, options: o)
            infos.append(info)
            guard backingChain, let next = info.fullBackingFilename else { break }
            name = next
            o.format = info.backingFormat
        }
        return infos
    }
}
