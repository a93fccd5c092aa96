#if canImport(Glibc)
import Glibc
#endif
import QBlockCore
import QBlockGraph
/// The qcow2 format driver as the registry sees it (``FormatDriver``): probing, opening
/// (``Qcow2Node/open(file:options:openBacking:)``), the options of `qemu-img create`,
/// `blockdev-add` and `blockdev-create`. Measuring is in `Qcow2+Measure.swift`.
public enum Qcow2Format: FormatDriver {
    /// The format name in options and `qemu-img info` (`qcow2`).
    public static let name = "qcow2"

    /// The magic "QFI\xfb" and the version.
    public static let probeLength = 8

    /// Probe score for the first bytes of a file: 100 for the qcow2 magic `QFI\xfb`, else 0
    /// (QEMU's `qcow2_probe`).
    public static func probe(_ head: [UInt8]) -> Int {
        head.count >= 4 && head[0] == 0x51 && head[1] == 0x46 && head[2] == 0x49 && head[3] == 0xfb ? 100 : 0
    }

    /// Opens `file` as a qcow2 image (``Qcow2Node/open(file:options:openBacking:)``); the
    /// backing file named in the header is opened through `openBacking` unless the options
    /// say otherwise.
    /// - Throws: ``BlockError`` `.corrupt` for a damaged header, `.unsupported` for
    ///   unknown incompatible features, or the backing's open error.
    public static func open(file: any BlockDriver, options: OpenOptions,
                            openBacking: (_ name: String, _ format: String?) async throws -> any BlockDriver) async throws -> any BlockDriver {
        try await Qcow2Node.open(file: file, options: options, openBacking: openBacking)
    }

    /// The permissions a qcow2 node takes on its file: the format defaults (write when
    /// read-write, no shared writers).
    public static func filePermissions(readOnly: Bool) -> (perm: BlockPermissions, shared: BlockPermissions) {
        BlockPermissions.formatDefaults(readOnly: readOnly)
    }

    /// qcow2 images can have a backing file.
    public static let supportsBackingFile = true
    /// qcow2 images can store compressed clusters (`qemu-img convert -c`).
    public static let supportsCompressedWrites = true

    /// The `-o` options `qemu-img create -f qcow2` accepts, with QEMU's defaults.
    /// (`encryption` is the legacy spelling of the AES choice: `off`, the default, is accepted,
    /// `on` refused, as qcow2 encryption is not implemented.)
    public static let createOptions: [CreateOption] = [
        CreateOption("encryption", .bool, help: "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)"),
        CreateOption("cluster_size", .size, default: "65536", help: "qcow2 cluster size"),
        CreateOption("extended_l2", .bool, default: "off", help: "Extended L2 tables"),
        CreateOption("preallocation", .string, help: "Preallocation mode (allowed values: off, metadata, falloc, full)"),
        CreateOption("compression_type", .string, default: "zlib", help: "Compression method used for image cluster compression"),
        CreateOption("size", .size, help: "Virtual disk size"),
        CreateOption("compat", .string, help: "Compatibility level (v2 [0.10] or v3 [1.1])"),
        CreateOption("backing_file", .string, help: "File name of a base image"),
        CreateOption("backing_fmt", .string, help: "Image format of the base image"),
        CreateOption("lazy_refcounts", .bool, default: "off", help: "Postpone refcount updates"),
        CreateOption("refcount_bits", .number, default: "16", help: "Width of a reference count entry in bits"),
        CreateOption("nocow", .bool, help: "Turn off copy-on-write (valid only on btrfs)", protocolLevel: true),
        CreateOption("extent_size_hint", .size, help: "Extent size hint for the image file, 0 to disable", protocolLevel: true),
    ]

    /// The `-o` options `qemu-img amend -f qcow2` takes (the backing file ones only to refuse
    /// them as QEMU does, pointing to `rebase`).
    public static let amendOptions: [CreateOption] = [
        CreateOption("backing_file", .string, help: "File name of a base image"),
        CreateOption("backing_fmt", .string, help: "Image format of the base image"),
        CreateOption("compat", .string, help: "Compatibility level (v2 [0.10] or v3 [1.1])"),
        CreateOption("lazy_refcounts", .bool, help: "Postpone refcount updates"),
        CreateOption("refcount_bits", .number, help: "Width of a reference count entry in bits"),
        CreateOption("size", .size, help: "Virtual disk size"),
    ]

    /// Creates a qcow2 image at `path` of `size` bytes with `-o` `options`, as
    /// `qemu-img create -f qcow2` does (header, L1 and refcount tables, preallocation).
    /// - Throws: ``BlockError`` `.invalidArgument` for a bad option (QEMU's message), or an I/O error.
    public static func create(path: String, size: Int64, options: [(String, String)]) async throws {
        var o = Qcow2CreateOptions()
        for (key, value) in options {
            do {
                try o.set(key, value)
            } catch {
                let e = error.asBlockError
                throw BlockError(e.code, e.message, path: path, operation: "create")
            }
        }
        try await Qcow2Node.create(path: path, size: size, options: o)
    }

    /// Reads the qcow2 driver's `blockdev-add` members (``Qcow2RuntimeOptions``); `data-file`
    /// is refused (external data files are not implemented).
    /// - Throws: ``BlockError`` `.invalidArgument` for a member of the wrong type,
    ///   `.unsupported` for what this driver cannot do.
    public static func readBlockdevOptions(_ m: any DriverOptionReader, into options: inout OpenOptions) throws {
        let runtime = try Qcow2RuntimeOptions.read(m)
        if m.value("data-file") != nil {
            throw BlockError(.unsupported, "data-file: qcow2 external data files are not implemented by this implementation")
        }
        options.formatOptions = runtime
    }
}

extension Qcow2Format: AmendableFormat {}

extension Qcow2Format: ExistingNodeCreatable {
    /// qcow2 consumes its size and preallocation: the node may have any size.
    public static func protocolRequest(size: Int64, options: [(String, String)]) -> (minimumSize: Int64, preallocation: String?) {
        (0, nil)
    }

    /// Writes a qcow2 image of `size` (rounded up to whole sectors, as qemu-img) onto `file`.
    public static func create(on file: any BlockDriver, size: Int64, options: [(String, String)]) async throws {
        var o = Qcow2CreateOptions()
        for (key, value) in options { try o.set(key, value) }
        do {
            try await Qcow2Node.create(on: file, size: size < 0 ? size : (size + 511) / 512 * 512, options: o)
        } catch let e as BlockError where e.errno == EFBIG {
            throw BlockError(.invalidArgument, "The image size is too large for file format 'qcow2' (try using a larger cluster size)",
                             errno: EFBIG)
        }
    }
}

extension Qcow2Format: BlockdevCreatable {
    /// QAPI's `BlockdevCreateOptionsQcow2`, member by member in the schema's order.
    /// External data files and encryption are refused once the job has checked the rest.
    public static func readBlockdevCreateOptions(_ m: any DriverOptionReader) throws -> BlockdevCreatePlan {
        guard let file = m.value("file") else { throw m.missingError("file") }
        let dataFile = m.value("data-file")
        let dataFileRaw = try m.optionalBool("data-file-raw")
        let extendedL2 = try m.optionalBool("extended-l2")
        guard let size = try m.optionalSize("size") else { throw m.missingError("size") }
        let version = try m.optionalEnum("version", ["v2", "v3"])
        let backingFile = try m.optionalString("backing-file")
        let backingFmt = try m.optionalDriverName("backing-fmt")
        let encrypt = m.value("encrypt")
        let clusterSize = try m.optionalSize("cluster-size")
        let prealloc = try m.optionalEnum("preallocation", Preallocation.allCases.map(\.rawValue))
        let lazy = try m.optionalBool("lazy-refcounts")
        let refcountBits = try m.optionalInt("refcount-bits")
        let compression = try m.optionalEnum("compression-type", ["zlib", "zstd"])
        var refusal: String?
        if dataFile != nil || dataFileRaw == true {
            refusal = "qcow2 external data files (data-file) are not supported by this implementation"
        } else if encrypt != nil {
            refusal = "qcow2 encryption (encrypt) is not supported by this implementation"
        }
        var q = Qcow2CreateOptions()
        q.version = version == "v2" ? 2 : 3
        // Out-of-range values become values the checks refuse with QEMU's message.
        if let clusterSize { q.clusterSize = clusterSize > Int64(Int32.max) || clusterSize < 0 ? 3 : Int(clusterSize) }
        if let prealloc, let p = Preallocation(rawValue: prealloc) { q.preallocation = p }
        q.lazyRefcounts = lazy ?? false
        q.extendedL2 = extendedL2 ?? false
        if let refcountBits { q.refcountBits = refcountBits > 64 || refcountBits < 0 ? 3 : Int(refcountBits) }
        if let compression, let c = Qcow2CompressionType(name: compression) { q.compressionType = c }
        q.backingFile = backingFile
        q.backingFormat = backingFmt
        let options = q
        return BlockdevCreatePlan(file: file, refusal: refusal,
                                  check: { try Qcow2Node.checkCreate(size: size, options: options) },
                                  create: { try await Qcow2Node.create(on: $0, size: size, options: options) })
    }
}
