import QBlockGraph
/// An image format this library reads and writes.
public enum ImageFormat: String, Sendable, Hashable, CaseIterable, CustomStringConvertible {
    /// QEMU's copy-on-write format: sparse, with backing files, snapshots and bitmaps.
    case qcow2
    /// The bytes of the disk, one to one.
    case raw

    /// The format's name as QEMU spells it (`qcow2`, `raw`).
    public var description: String { rawValue }

    /// The format a driver implements, looking through filters and graph wrappers; nil for
    /// a driver that is no image format.
    init?(of node: any BlockDriver) {
        self.init(rawValue: node.skippingFilters.innermostDriver.driverName)
    }
}

/// Which format to open an image with: a given one, or the one its first bytes show.
///
/// ```swift
/// try await Image.withOpened("disk.img", format: .probe) { … }
/// try await Image.withOpened("disk.qcow2", format: .qcow2) { … }
/// ```
public struct FormatChoice: Sendable, Hashable {
    /// The format to use; nil probes.
    public let format: ImageFormat?

    /// Open as `format`, whatever the file holds.
    public static func exactly(_ format: ImageFormat) -> FormatChoice { FormatChoice(format: format) }
    /// Guess from the first bytes: qcow2 by its magic, raw otherwise. Never probe an image a
    /// guest wrote to as raw: the guest could have written a qcow2 header into it.
    public static let probe = FormatChoice(format: nil)
    /// Open as qcow2.
    public static let qcow2 = FormatChoice(format: .qcow2)
    /// Open as raw.
    public static let raw = FormatChoice(format: .raw)
}

/// Whether an image is opened for reading only or for reading and writing.
public enum AccessMode: Sendable, Hashable {
    /// Writes are refused; the image takes QEMU's shared read lock.
    case readOnly
    /// Reads and writes; the image takes QEMU's write lock (other writers are refused).
    case readWrite
}

/// How an open image coordinates with other processes through QEMU's image locks.
public enum ImageLocking: Sendable, Hashable {
    /// Take the locks QEMU takes: a writer excludes other writers, readers exclude writers
    /// of qcow2 images.
    case standard
    /// Share everything (qemu-img's `-U`): read an image another process writes. Only for
    /// ``AccessMode/readOnly``; the data read may be inconsistent while the writer runs.
    case shareAll
    /// Take no locks at all.
    case none
}

/// The backing file a new image starts from.
public struct BackingImage: Sendable, Hashable {
    /// The backing file's name as recorded in the new image: absolute, or relative to the
    /// new image's directory (as `qemu-img create -b` records it).
    public var path: String
    /// The backing file's format (recorded in the image, never probed again).
    public var format: ImageFormat

    /// - Parameters:
    ///   - path: the backing file, absolute or relative to the new image's directory.
    ///   - format: its format.
    public init(_ path: String, format: ImageFormat) {
        self.path = path
        self.format = format
    }
}

/// Options for creating an image (a typed subset of `qemu-img create -o`).
public struct ImageCreateOptions: Sendable, Hashable {
    /// qcow2: bytes per cluster, a power of two from 512 to 2 MiB; nil: 64 KiB.
    public var clusterSize: Int64?
    /// How much of the image is allocated up front.
    public var preallocation: Preallocation
    /// qcow2: defer refcount updates (faster writes; `img check -r` needed after a crash).
    public var lazyRefcounts: Bool
    /// qcow2: subclusters (32 per cluster) in extended L2 entries.
    public var extendedL2: Bool

    /// - Parameters:
    ///   - clusterSize: qcow2 cluster size in bytes; nil: 64 KiB.
    ///   - preallocation: what to allocate up front.
    ///   - lazyRefcounts: qcow2 lazy refcounts.
    ///   - extendedL2: qcow2 extended L2 entries.
    public init(clusterSize: Int64? = nil, preallocation: Preallocation = .off,
                lazyRefcounts: Bool = false, extendedL2: Bool = false) {
        self.clusterSize = clusterSize
        self.preallocation = preallocation
        self.lazyRefcounts = lazyRefcounts
        self.extendedL2 = extendedL2
    }

    /// The option pairs ``ImageCreator`` takes (only those that differ from the defaults, so
    /// that a raw image with default options gets none of qcow2's).
    var pairs: [(String, String)] {
        var p: [(String, String)] = []
        if let clusterSize { p.append(("cluster_size", String(clusterSize))) }
        if preallocation != .off { p.append(("preallocation", preallocation.rawValue)) }
        if lazyRefcounts { p.append(("lazy_refcounts", "on")) }
        if extendedL2 { p.append(("extended_l2", "on")) }
        return p
    }
}
