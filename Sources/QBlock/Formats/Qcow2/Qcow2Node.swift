// TEMPORARY API SKELETON — being replaced by the real driver in this same session.
public final class Qcow2Node: BlockDriver, @unchecked Sendable {
    public let driverName = "qcow2"
    public let hostFile: FileNode
    public var file: (any BlockDriver)? { hostFile }
    public private(set) var backing: (any BlockDriver)?
    public var filename: String { hostFile.filename }
    public var isReadOnly: Bool { hostFile.isReadOnly }
    public var requestAlignment: Int { 1 }
    public private(set) var length: Int64 = 0
    /// Cluster size in bytes.
    public private(set) var clusterSize: Int = 65536
    /// The backing file name exactly as stored in the header.
    public private(set) var backingFileName: String?
    /// The backing format from the header extension.
    public private(set) var backingFormat: String?
    /// The dirty bit (v3 incompatible feature bit 0).
    public private(set) var isDirty = false
    public var formatInfo: Qcow2FormatInfo {
        Qcow2FormatInfo(compat: "1.1", lazyRefcounts: false, refcountBits: 16, corrupt: false, extendedL2: false, compressionType: .zlib)
    }

    init(file: FileNode) { hostFile = file }

    public static func open(file: FileNode, options: OpenOptions,
                            openBacking: (String, String?) async throws -> any BlockDriver) async throws -> Qcow2Node {
        throw BlockError(.unsupported, "qcow2 skeleton")
    }

    public static func create(path: String, size: Int64, options: Qcow2CreateOptions) async throws {
        throw BlockError(.unsupported, "qcow2 skeleton")
    }

    public func check(repair: CheckRepair?) async throws -> CheckResult {
        throw BlockError(.unsupported, "qcow2 skeleton")
    }

    public func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws {}
    public func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags) async throws {}
    public func writeZeroes(at offset: Int64, length: Int64, flags: WriteFlags) async throws {}
    public func discard(at offset: Int64, length: Int64) async throws {}
    public func flush() async throws {}
    public func blockStatus(at offset: Int64, length: Int64) async throws -> BlockStatus { BlockStatus(flags: [], length: length) }
    public func truncate(to length: Int64, preallocation: Preallocation) async throws {}
    public func close() async throws {}
}
