import QBlockCore
/// Flags on a write or write-zeroes request.
public struct WriteFlags: OptionSet, Sendable, Hashable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    /// Force unit access: the data is on stable storage when the request completes.
    public static let fua = WriteFlags(rawValue: 1 << 0)
    /// For write-zeroes: the range may be deallocated (punched) as long as it reads as zeros.
    public static let mayUnmap = WriteFlags(rawValue: 1 << 1)
    /// For write-zeroes: fail with `.unsupported` instead of writing zeros explicitly
    /// when the request cannot be done efficiently (NBD's FAST_ZERO).
    public static let noFallback = WriteFlags(rawValue: 1 << 2)
}

/// The allocation status of a run of bytes at one node, as `bdrv_block_status` reports it.
public struct BlockStatus: Sendable, Equatable, CustomStringConvertible {
    /// What a run of bytes is: data, zeros, allocated here, compressed.
    public struct Flags: OptionSet, Sendable, Hashable {
        public let rawValue: UInt32
        public init(rawValue: UInt32) { self.rawValue = rawValue }
        /// Reads return data stored at this node (or below, for a filter/raw node).
        public static let data = Flags(rawValue: 1 << 0)
        /// Reads return zeros.
        public static let zero = Flags(rawValue: 1 << 1)
        /// The content is determined by this node (not by its backing file).
        public static let allocated = Flags(rawValue: 1 << 2)
        /// The data is stored compressed (no host offset).
        public static let compressed = Flags(rawValue: 1 << 3)
    }
    /// What the run is.
    public var flags: Flags
    /// Length of the run in bytes (at least 1, at most what was asked for).
    public var length: Int64
    /// Where the run starts in this node's `file` child, when that is meaningful.
    public var hostOffset: Int64?

    /// Creates a status for a run of `length` bytes.
    public init(flags: Flags, length: Int64, hostOffset: Int64? = nil) {
        self.flags = flags
        self.length = length
        self.hostOffset = hostOffset
    }

    public var description: String {
        "BlockStatus(\(length) bytes, data=\(flags.contains(.data)) zero=\(flags.contains(.zero)) allocated=\(flags.contains(.allocated)) offset=\(hostOffset.map(String.init) ?? "-"))"
    }
}

/// Preallocation modes (qemu-img's `preallocation=` option).
public enum Preallocation: String, Sendable, CaseIterable {
    case off, metadata, falloc, full
}

/// The one interface every block node implements: format drivers (raw, qcow2) and
/// protocol drivers (file, nbd) alike.
///
/// All offsets and lengths are in bytes. Callers keep requests within ``length``; the
/// front ends (`Image`, the tools, the NBD server) check that with
/// `checkRequest(offset:length:operation:)`, so drivers may assume it. Many requests may be
/// in flight at once; each driver serializes what it must internally.
public protocol BlockDriver: AnyObject, Sendable {
    /// The driver name as QEMU spells it: "file", "raw", "qcow2".
    var driverName: String { get }
    /// The file name this node was opened from.
    var filename: String { get }
    /// Virtual size in bytes.
    var length: Int64 { get }
    /// True if the node refuses writes.
    var isReadOnly: Bool { get }
    /// The alignment, in bytes, that requests must have at this node (1 = any).
    var requestAlignment: Int { get }
    /// The protocol child that holds this node's bytes, if it is a format node.
    var file: (any BlockDriver)? { get }
    /// The backing node, if this format supports and has one.
    var backing: (any BlockDriver)? { get }

    /// Reads `buffer.count` bytes at `offset`.
    func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws
    /// Writes `buffer` at `offset`.
    func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags) async throws
    /// Makes `length` bytes at `offset` read as zeros.
    func writeZeroes(at offset: Int64, length: Int64, flags: WriteFlags) async throws
    /// Hints that `length` bytes at `offset` are no longer needed. Content afterwards is unspecified
    /// for protocol nodes; format nodes read zeros or the backing file's data.
    func discard(at offset: Int64, length: Int64) async throws
    /// Makes every completed write durable.
    func flush() async throws
    /// The status of the run of bytes starting at `offset`, at most `length` long.
    func blockStatus(at offset: Int64, length: Int64) async throws -> BlockStatus
    /// Changes the virtual size.
    func truncate(to length: Int64, preallocation: Preallocation) async throws
    /// Flushes and releases everything (children included).
    func close() async throws
}

extension BlockDriver {
    /// The chain of nodes from this one down through its backing files.
    public var backingChain: [any BlockDriver] {
        var chain: [any BlockDriver] = [self]
        var cur: (any BlockDriver)? = self.backing
        while let c = cur { chain.append(c); cur = c.backing }
        return chain
    }
}

extension BlockDriver {
    /// Reads `count` bytes at `offset` into a new array (for metadata and tests; the data
    /// path uses caller-owned buffers).
    public func read(at offset: Int64, count: Int) async throws -> [UInt8] {
        let buf = AlignedBuffer(count: count)
        try await buf.withUnsafeMutableBytes { try await self.read(at: offset, into: $0) }
        return buf.bytes
    }

    /// Writes `bytes` at `offset` (for metadata and tests).
    public func write(at offset: Int64, bytes: [UInt8], flags: WriteFlags = []) async throws {
        let buf = AlignedBuffer(count: bytes.count)
        buf.withUnsafeMutableBytes { b in bytes.withUnsafeBytes { b.copyMemory(from: $0) } }
        try await buf.withUnsafeBytes { try await self.write(at: offset, from: $0, flags: flags) }
    }
}

/// A node that forwards I/O to one child and adds behaviour but no content of its own
/// (QEMU's filter drivers: `copy-on-read`, the mirror's `mirror_top`, later throttle and
/// copy-before-write). Questions about what a disk holds — allocation, the backing chain,
/// block status walks — look through a filter to its child (QEMU's `bdrv_skip_filters`);
/// reads and writes still go through the filter, which is where its behaviour lives.
public protocol BlockFilter: BlockDriver {
    /// The node this filter forwards to.
    var filteredChild: any BlockDriver { get }
}

/// A format whose allocation unit matters to writers above it: a write smaller than one
/// unit makes the format copy the rest of the unit from its backing file.
public protocol ClusteredFormat: BlockDriver {
    /// Bytes per allocation unit (a qcow2 cluster).
    var clusterSize: Int { get }
}

extension BlockDriver {
    /// The filter's child when this node (below any graph wrapper) is a filter, else nil.
    public var filterChild: (any BlockDriver)? {
        (innermostDriver as? any BlockFilter)?.filteredChild
    }

    /// This node with every filter above real content skipped (QEMU's `bdrv_skip_filters`).
    public var skippingFilters: any BlockDriver {
        var d: any BlockDriver = self
        while let c = d.filterChild { d = c }
        return d
    }

    /// The allocation unit of the format below any filters and graph wrappers, if it has one.
    public var formatClusterSize: Int? {
        (skippingFilters.innermostDriver as? any ClusteredFormat)?.clusterSize
    }

    /// Whether two references name the same node, looking through filters and graph wrappers.
    public func isSameNode(as other: (any BlockDriver)?) -> Bool {
        guard let other else { return false }
        if self === other { return true }
        return skippingFilters.innermostDriver === other.skippingFilters.innermostDriver
    }
}
