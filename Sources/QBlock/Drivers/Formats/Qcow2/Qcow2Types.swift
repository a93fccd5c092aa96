import QBlockCore
import QBlockGraph
/// Compression algorithms of qcow2 compressed clusters (header field `compression_type`).
public enum Qcow2CompressionType: UInt8, Sendable {
    case zlib = 0
    case zstd = 1
    /// The name used by the `compression_type` option (`zlib` or `zstd`).
    public var name: String { self == .zlib ? "zlib" : "zstd" }
    /// The type named `name` (`zlib` or `zstd`), or `nil` for any other name.
    public init?(name: String) {
        switch name {
        case "zlib": self = .zlib
        case "zstd": self = .zstd
        default: return nil
        }
    }
}

/// Options of `img create -f qcow2 -o ...`, with qemu-img's defaults.
public struct Qcow2CreateOptions: Sendable {
    /// Cluster size in bytes: a power of two from 512 to 2 MiB.
    public var clusterSize: Int = 65536
    /// 2 for compat=0.10, 3 for compat=1.1.
    public var version: Int = 3
    /// Set the `lazy_refcounts` compatible feature (version 3 only).
    public var lazyRefcounts = false
    /// How much to allocate up front: `off`, `metadata`, `falloc` or `full`.
    public var preallocation: Preallocation = .off
    /// The algorithm for compressed clusters (`zstd` needs version 3).
    public var compressionType: Qcow2CompressionType = .zlib
    /// Refcount width in bits: 1, 2, 4, 8, 16, 32 or 64 (16 for compat=0.10).
    public var refcountBits = 16
    /// The backing file name as it is to be stored in the header.
    public var backingFile: String?
    /// The backing file's format, stored in the backing format header extension.
    public var backingFormat: String?
    /// Use extended L2 entries (32 subclusters per cluster; version 3 only).
    public var extendedL2 = false
    /// The image file's extent size hint (`extent_size_hint`, passed to the file as QEMU's
    /// qcow2 passes it to its protocol); nil: the file driver's default, 1 MiB.
    public var extentSizeHint: Int64?
    /// Ask the file system not to copy on write (`nocow`, Linux's `FS_NOCOW_FL`, passed to
    /// the file as QEMU's qcow2 passes it to its protocol; ignored where unknown, as QEMU).
    public var nocow = false

    /// Options with qemu-img's defaults: 64 KiB clusters, compat 1.1, 16-bit refcounts, zlib.
    public init() {}

    /// Parses a qemu-img `-o` option into these options.
    /// - Throws: ``BlockError`` `.invalidArgument` for unknown options or values.
    public mutating func set(_ key: String, _ value: String) throws {
        func bool(_ v: String) throws -> Bool {
            switch v {
            case "on", "true", "yes": return true
            case "off", "false", "no": return false
            default: throw BlockError(.invalidArgument, "Parameter '\(key)' expects 'on' or 'off'")
            }
        }
        switch key {
        case "cluster_size":
            guard let v = SizeParser.parse(value), v >= 512, v <= 2 << 20, v & (v - 1) == 0 else {
                throw BlockError(.invalidArgument, "Cluster size must be a power of two between 512 and 2048k")
            }
            clusterSize = Int(v)
        case "compat":
            switch value {
            case "0.10", "v2": version = 2
            case "1.1", "v3": version = 3
            // (QEMU's create maps compat onto the QAPI member `version`, whose check words it.)
            default: throw BlockError(.invalidArgument, "Parameter 'version' does not accept value '\(value)'")
            }
        case "encryption":
            // The legacy spelling of encrypt.format=aes: off is the default; qcow2 encryption
            // is not implemented.
            if try bool(value) {
                throw BlockError(.unsupported, "qcow2 encryption is not supported by this implementation")
            }
        case "lazy_refcounts": lazyRefcounts = try bool(value)
        case "extended_l2": extendedL2 = try bool(value)
        case "preallocation":
            guard let p = Preallocation(rawValue: value) else {
                throw BlockError(.invalidArgument, "Parameter 'preallocation' does not accept value '\(value)'")
            }
            preallocation = p
        case "compression_type":
            guard let c = Qcow2CompressionType(name: value) else {
                throw BlockError(.invalidArgument, "Parameter 'compression-type' does not accept value '\(value)'")
            }
            compressionType = c
        case "refcount_bits":
            guard let v = Int(value), v > 0, v <= 64, v & (v - 1) == 0 else {
                throw BlockError(.invalidArgument, "Refcount width must be a power of two and may not exceed 64 bits")
            }
            refcountBits = v
        case "nocow": nocow = try bool(value)
        case "backing_file": backingFile = value
        case "backing_fmt": backingFormat = value
        case "extent_size_hint":
            guard let v = SizeParser.parse(value) else {
                throw BlockError(.invalidArgument, "Parameter 'extent_size_hint' expects a non-negative number below 2^64")
            }
            guard v <= Int64(UInt32.max) else { throw BlockError(.invalidArgument, "Extent size hint is too large") }
            extentSizeHint = v
        default:
            throw BlockError(.invalidArgument, "Invalid parameter '\(key)'")
        }
    }
}

/// What `qemu-img info` shows under "format-specific" for a qcow2 image.
public struct Qcow2FormatInfo: Sendable, Equatable {
    /// "0.10" or "1.1".
    public var compat: String
    /// Whether the `lazy_refcounts` feature is set.
    public var lazyRefcounts: Bool
    /// The refcount width in bits.
    public var refcountBits: Int
    /// Whether the image is marked corrupt (QEMU then opens it read-only).
    public var corrupt: Bool
    /// Whether the image uses extended L2 entries (subclusters).
    public var extendedL2: Bool
    /// The algorithm of the image's compressed clusters.
    public var compressionType: Qcow2CompressionType
    /// The persistent bitmaps as listed on disk (`qemu-img info` shows them for v3 images
    /// that have any).
    public var bitmaps: [Qcow2BitmapInfo] = []
}
