import QBlockCore
import QBlockGraph
/// The `file` protocol driver as the registry sees it (``ProtocolDriver``): a host file or
/// block device, named by its path. It takes every file name no other protocol claims, opens
/// a ``FileNode``, and creates host files for `blockdev-create`.
public enum FileProtocol: ProtocolCreatable {
    /// `file`, as QEMU names the driver.
    public static let name = "file"

    /// None: the file protocol takes plain paths (and every name with a scheme no other
    /// protocol claims, which then fails as a missing file).
    public static let uriSchemes: [String] = []

    /// "open": qemu-img repeats the file name in these errors.
    public static let openOperation = "open"

    /// Opens a ``FileNode`` on the calling thread, without locks (`ImageOpener` locks it once
    /// the format is known).
    /// - Throws: ``BlockError`` from open(2) and fstat(2) (`.notFound`, `.permissionDenied`, …).
    public static func open(filename: String, options: OpenOptions) async throws -> any BlockDriver {
        try FileNode(path: filename, readOnly: options.readOnly, cache: options.cache, locking: false, aio: options.aio)
    }

    /// The first bytes read synchronously with one pread(2) (``FileNode/probeBytes(count:)``,
    /// empty when the read fails).
    public static func probeHead(of node: any BlockDriver, count: Int) async throws -> [UInt8] {
        guard let file = node as? FileNode else { return try await node.read(at: 0, count: Int(min(Int64(count), node.length))) }
        return file.probeBytes(count: count)
    }

    /// Reads `filename` and the members QEMU's `file` driver has: `aio` (``AIOMode``; absent:
    /// io_uring when the kernel has it), `locking` (`off`: no image locks; `on` and `auto`:
    /// QEMU's locks, OFD locks being always there on Linux), `pr-manager` (refused at open:
    /// there are no persistent-reservation manager objects), and `drop-cache`,
    /// `x-check-cache-dropped`, `aio-max-batch`, which only matter to QEMU's migration and
    /// Linux AIO batching (type-checked; nothing here depends on them). The node opens on
    /// ``IOThreadPool`` and takes QEMU's default permissions of a node of its own
    /// (``BlockPermissions/formatDefaults(readOnly:)``).
    /// - Throws: the reader's errors; the opener throws ``BlockError`` "Could not open
    ///   'PATH': …" (with the errno) or ``ImageLock``'s "Failed to get (shared) "PERM" lock".
    public static func readBlockdevOptions(_ m: any DriverOptionReader) throws -> ProtocolOpener {
        let filename = try m.requiredString("filename")
        let locking = try m.optionalEnum("locking", ["auto", "on", "off"]) ?? "auto"
        let aio = try m.optionalEnum("aio", AIOMode.allCases.map(\.rawValue)).flatMap(AIOMode.init(qemuName:))
        let prManager = try m.optionalString("pr-manager")
        _ = try m.optionalBool("drop-cache")
        _ = try m.optionalBool("x-check-cache-dropped")
        _ = try m.optionalInt("aio-max-batch")
        return { readOnly, cache in
            if let prManager { throw BlockError(.invalidArgument, "No persistent reservation manager with id '\(prManager)'") }
            let result: Result<FileNode, BlockError> = await IOThreadPool.shared.run {
                do {
                    let f = try FileNode(path: filename, readOnly: readOnly, cache: cache, locking: false, aio: aio)
                    guard locking != "off" else { return .success(f) }
                    let (perm, shared) = BlockPermissions.formatDefaults(readOnly: readOnly)
                    do { try f.lock(perm: perm, shared: shared) } catch let e as BlockError {
                        Task { try? await f.close() }
                        return .failure(e)
                    }
                    return .success(f)
                } catch let e as BlockError {
                    return .failure(BlockError(e.code, "Could not open '\(filename)': \(e.message)", errno: e.errno))
                } catch {
                    return .failure(BlockError(.io, "Could not open '\(filename)': \(error)"))
                }
            }
            return try result.get()
        }
    }

    /// `{"driver": "file", "filename": PATH}`.
    public static func blockdevOptions(filename: String) throws -> QObject.Dict {
        QObject.Dict([("driver", .string(name)), ("filename", .string(filename))])
    }

    /// The file name, and as fixed members the driver options given (`locking`, `aio`,
    /// `pr-manager`, `drop-cache`, `x-check-cache-dropped`, `aio-max-batch`: none can change
    /// in place here).
    public static func readReopenOptions(_ m: any DriverOptionReader) throws -> ProtocolReopenOptions? {
        let filename = try m.requiredString("filename")
        var fixed: [(String, QObject)] = []
        for k in ["locking", "aio", "pr-manager"] { if let v = m.value(k) { _ = try m.optionalString(k); fixed.append((k, v)) } }
        for k in ["drop-cache", "x-check-cache-dropped"] { if let v = m.value(k) { _ = try m.optionalBool(k); fixed.append((k, v)) } }
        if let v = m.value("aio-max-batch") { _ = try m.optionalInt("aio-max-batch"); fixed.append(("aio-max-batch", v)) }
        return ProtocolReopenOptions(filename: filename, fixedMembers: fixed)
    }

    /// QEMU's `BlockdevCreateOptionsFile`: `filename`, `size` (mandatory), `preallocation`,
    /// `nocow`, `extent-size-hint`. A nonzero extent size hint is refused by the check (only
    /// XFS honours it in QEMU; it is never set here, so it is refused rather than ignored).
    /// The job creates the file as ``FileCreation/createExactly(path:size:preallocation:nocow:)`` does.
    public static func readBlockdevCreateOptions(_ m: any DriverOptionReader) throws -> ProtocolCreatePlan {
        let filename = try m.requiredString("filename")
        guard let size = try m.optionalSize("size") else { throw m.missingError("size") }
        let prealloc = try m.optionalEnum("preallocation", Preallocation.allCases.map(\.rawValue)).flatMap(Preallocation.init) ?? .off
        let nocow = try m.optionalBool("nocow") ?? false
        let hint = try m.optionalSize("extent-size-hint")
        return ProtocolCreatePlan(check: {
            if let hint, hint != 0 {
                throw BlockError(.unsupported, "extent-size-hint is not supported by this implementation")
            }
        }, create: {
            try await FileCreation.createExactly(path: filename, size: size, preallocation: prealloc, nocow: nocow)
        })
    }

    /// A `file` node for `blockdev-create` to write onto: `filename`, and `read-only`,
    /// `node-name`, `discard`, `detect-zeroes`, `locking` and `aio` accepted and ignored. The
    /// file opens read-write, taking write and resize and sharing reading and unchanged writes.
    /// - Throws: the reader's errors; the opener throws ``BlockError`` "Could not open 'PATH': …".
    public static func readCreateTarget(_ m: any DriverOptionReader) throws -> @Sendable () async throws -> any BlockDriver {
        let filename = try m.requiredString("filename")
        for k in ["node-name", "discard", "detect-zeroes", "locking", "aio"] { _ = m.value(k) }
        _ = try m.optionalBool("read-only")
        return {
            do {
                return try FileNode(path: filename, readOnly: false, perm: [.consistentRead, .write, .resize],
                                    shared: [.consistentRead, .writeUnchanged])
            } catch {
                let e = error.asBlockError
                throw BlockError(e.code, "Could not open '\(filename)': \(e.message)", errno: e.errno)
            }
        }
    }
}
