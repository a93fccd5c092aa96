import QBlockCore
import QBlockDrivers
import QBlockGraph
import QBlockJobs
import QBlockOperations
/// `blockdev-create` (QEMU 7.2's `qapi/block-core.json`): image creation as a job of type
/// `create`, with `auto-finalize` on and `auto-dismiss` off, as QEMU runs it. Drivers:
/// `file` (a host file) and `qcow2` (an image written onto an open node — libvirt's flow
/// is create file, `blockdev-add` it, create qcow2 on that node, `blockdev-add` qcow2).
/// Other drivers are refused: those QEMU cannot create either with its own message,
/// those it can (vmdk, luks, …) as not supported here.
extension QMPMonitor {
    /// QAPI's `BlockdevDriver` (QEMU 7.2): the values `driver` members accept.
    static let blockdevDriverNames = [
        "blkdebug", "blklogwrites", "blkreplay", "blkverify", "bochs", "cloop", "compress", "copy-before-write",
        "copy-on-read", "dmg", "file", "snapshot-access", "ftp", "ftps", "gluster", "host_cdrom", "host_device",
        "http", "https", "iscsi", "luks", "nbd", "nfs", "null-aio", "null-co", "nvme", "parallels", "preallocate",
        "qcow", "qcow2", "qed", "quorum", "raw", "rbd", "replication", "ssh", "throttle", "vdi", "vhdx", "vmdk",
        "vpc", "vvfat",
    ]
    /// The drivers QEMU can create (`bdrv_co_create`); of them we create `file` and `qcow2`.
    static let qemuCreateDrivers: Set<String> = ["file", "gluster", "luks", "nfs", "parallels", "qcow", "qcow2", "qed",
                                                 "rbd", "ssh", "vdi", "vhdx", "vmdk", "vpc"]

    func registerCreateCommands() {
        register("blockdev-create") { args, ctx in
            let jobID = try args.string("job-id")
            let options = try args.object("options")
            let request = try QMPCreateRequest.parse(options)
            try args.done()
            let job = try ctx.monitor.jobs.createForQMP(BlockdevCreateJob(request: request, graph: ctx.graph),
                                                        options: JobOptions(id: jobID, autoFinalize: true, autoDismiss: false))
            ctx.monitor.jobs.start(job)
            return .dict(QObject.Dict())
        }
    }
}

/// A checked `blockdev-create` request (`BlockdevCreateOptions`).
enum QMPCreateRequest: Sendable {
    case file(path: String, size: Int64, preallocation: Preallocation, nocow: Bool)
    /// `file` is a node name or a `BlockdevRef` object, opened when the job runs.
    /// `refusal`: why the job fails once the node is found and the options checked (a
    /// feature we do not implement), in QEMU's order of checks.
    case qcow2(file: QObject, size: Int64, options: Qcow2CreateOptions, refusal: String?)

    /// A QAPI `size` member (uint64 on the wire; a negative JSON number is taken as is, as
    /// QEMU's visitor takes it, and fails later).
    static func sizeMember(_ o: QMPArguments, _ key: String) throws -> Int64? {
        guard let v = o.value(key) else { return nil }
        guard case .int(let i) = v else { throw QMPError.generic("Parameter '\(o.name(key))' expects uint64") }
        return i
    }

    static func parse(_ o: QMPArguments) throws -> QMPCreateRequest {
        let driver = try o.enumValue("driver", QMPMonitor.blockdevDriverNames)
        switch driver {
        case "file":
            let filename = try o.string("filename")
            guard let size = try sizeMember(o, "size") else { throw o.missing("size") }
            let prealloc = try o.optionalEnum("preallocation", Preallocation.allCases.map(\.rawValue)).flatMap(Preallocation.init) ?? .off
            let nocow = try o.bool("nocow", default: false)
            let hint = try sizeMember(o, "extent-size-hint")
            try o.done()
            if let hint, hint != 0 {
                // Only XFS honours the hint in QEMU; we never set it, so we refuse rather than ignore it.
                throw QMPError.generic("extent-size-hint is not supported by this implementation")
            }
            return .file(path: filename, size: size, preallocation: prealloc, nocow: nocow)
        case "qcow2":
            guard let file = o.value("file") else { throw o.missing("file") }
            let dataFile = o.value("data-file")
            let dataFileRaw = try o.optionalBool("data-file-raw")
            let extendedL2 = try o.optionalBool("extended-l2")
            guard let size = try sizeMember(o, "size") else { throw o.missing("size") }
            let version = try o.optionalEnum("version", ["v2", "v3"])
            let backingFile = try o.optionalString("backing-file")
            let backingFmt = try o.optionalEnum("backing-fmt", QMPMonitor.blockdevDriverNames)
            let encrypt = o.value("encrypt")
            let clusterSize = try sizeMember(o, "cluster-size")
            let prealloc = try o.optionalEnum("preallocation", Preallocation.allCases.map(\.rawValue))
            let lazy = try o.optionalBool("lazy-refcounts")
            let refcountBits = try o.optionalInt("refcount-bits")
            let compression = try o.optionalEnum("compression-type", ["zlib", "zstd"])
            try o.done()
            switch file {
            case .string, .dict: break
            default: throw QMPError.generic("Invalid parameter type for '\(o.name("file"))', expected: BlockdevRef")
            }
            var refusal: String?
            if dataFile != nil || dataFileRaw == true {
                refusal = "qcow2 external data files (data-file) are not supported by this implementation"
            } else if encrypt != nil {
                refusal = "qcow2 encryption (encrypt) is not supported by this implementation"
            }
            var q = Qcow2CreateOptions()
            q.version = version == "v2" ? 2 : 3
            if let clusterSize { q.clusterSize = clusterSize > Int64(Int32.max) || clusterSize < 0 ? 3 : Int(clusterSize) }
            if let prealloc, let p = Preallocation(rawValue: prealloc) { q.preallocation = p }
            q.lazyRefcounts = lazy ?? false
            q.extendedL2 = extendedL2 ?? false
            if let refcountBits { q.refcountBits = refcountBits > 64 || refcountBits < 0 ? 3 : Int(refcountBits) }
            if let compression, let c = Qcow2CompressionType(name: compression) { q.compressionType = c }
            q.backingFile = backingFile
            q.backingFormat = backingFmt
            return .qcow2(file: file, size: size, options: q, refusal: refusal)
        default:
            o.markAllRead()
            try o.done()
            // Members of drivers without a create branch are unexpected (QEMU's union has none).
            if !QMPMonitor.qemuCreateDrivers.contains(driver) {
                if let extra = o.dict.qemuOrdered.first(where: { $0.key != "driver" }) {
                    throw QMPError.generic("Parameter '\(o.name(extra.key))' is unexpected")
                }
                throw QMPError.generic("Driver does not support blockdev-create")
            }
            throw QMPError.generic("blockdev-create: driver '\(driver)' is not supported by this implementation")
        }
    }
}

/// The `create` job: runs one creation; progress is 0/1, then 1/1 (also on failure), as QEMU's.
final class BlockdevCreateJob: JobDriver, @unchecked Sendable {
    // @unchecked: immutable after init; the graph is thread-safe.
    let request: QMPCreateRequest
    let graph: BlockGraph
    var jobType: JobType { .create }

    init(request: QMPCreateRequest, graph: BlockGraph) {
        self.request = request
        self.graph = graph
    }

    func run(_ job: Job) async throws {
        job.setProgressTotal(1)
        defer { job.progressDone(1) }
        switch request {
        case .file(let path, let size, let prealloc, let nocow):
            try await ImageCreator.createFile(path: path, size: size, preallocation: prealloc, nocow: nocow)
        case .qcow2(let fileRef, let size, let options, let refusal):
            let (file, opened) = try await openFile(fileRef)
            do {
                // QEMU's order: the node, the options, the node's permissions, then the work.
                try Qcow2Node.checkCreate(size: size, options: options)
                try checkPermissions(fileRef)
                if let refusal { throw BlockError(.unsupported, refusal) }
                try await Qcow2Node.create(on: file, size: size, options: options)
            } catch {
                if opened { try? await file.close() }
                throw error
            }
            if opened { try await file.close() }
        }
    }

    /// Fails, in QEMU's words, when a named node is another node's `file` (which does not
    /// share writing and resizing) or read-only.
    private func checkPermissions(_ ref: QObject) throws {
        guard case .string(let name) = ref, let node = graph.node(named: name) else { return }
        if let parent = graph.nodes.first(where: { ($0.driver.file as AnyObject?) === node }) {
            throw BlockError(.busy, "Permission conflict on node '\(name)': permissions 'write, resize' are both required by an unnamed block device (uses node '\(name)' as 'root' child) and unshared by node '\(parent.nodeName)' (uses node '\(name)' as 'file' child).")
        }
        if node.isReadOnly { throw BlockError(.readOnly, "Block node is read-only") }
    }

    /// The node `ref` names, or a new node opened from a `BlockdevRef` object (then closed
    /// after creation, as QEMU drops its reference). Checks the node may be written and resized.
    private func openFile(_ ref: QObject) async throws -> (any BlockDriver, Bool) {
        switch ref {
        case .string(let name):
            guard let node = graph.node(named: name) else {
                throw BlockError(.notFound, "Cannot find device='\(name)' nor node-name='\(name)'")
            }
            return (node, false)
        case .dict(let d):
            let a = QMPArguments(d, path: "options.file")
            let driver = try a.enumValue("driver", QMPMonitor.blockdevDriverNames)
            guard driver == "file" else {
                throw BlockError(.unsupported, "blockdev-create: a new 'file' node may only use driver 'file' here")
            }
            let filename = try a.string("filename")
            for k in ["node-name", "discard", "detect-zeroes", "locking", "aio"] { _ = a.value(k) }
            _ = try a.optionalBool("read-only")
            try a.done()
            do {
                let f = try FileNode(path: filename, readOnly: false, perm: [.consistentRead, .write, .resize],
                                     shared: [.consistentRead, .writeUnchanged])
                return (f, true)
            } catch {
                let e = error.asBlockError
                throw BlockError(e.code, "Could not open '\(filename)': \(e.message)", errno: e.errno)
            }
        default:
            throw BlockError(.invalidArgument, "Invalid parameter type for 'options.file', expected: BlockdevRef")
        }
    }
}
