import QBlockCore
import QBlockDrivers
import QBlockGraph
import QBlockJobs
import QBlockOperations
import QBlockOpen
/// `blockdev-create` (QEMU 7.2's `qapi/block-core.json`): image creation as a job of type
/// `create`, with `auto-finalize` on and `auto-dismiss` off, as QEMU runs it. Drivers:
/// every ``ProtocolCreatable`` protocol of ``ProtocolRegistry`` (`file`: a host file) and
/// every ``BlockdevCreatable`` format of ``FormatRegistry`` (an image written onto an open
/// node — libvirt's flow is create file, `blockdev-add` it, create qcow2 on that node,
/// `blockdev-add` qcow2). Other drivers are refused: those QEMU
/// cannot create either with its own message, those it can (vmdk, luks, …) as not
/// supported here.
extension QMPMonitor {
    /// QAPI's `BlockdevDriver` (QEMU 7.2): the values `driver` members accept.
    static var blockdevDriverNames: [String] { ImageOpener.qemuDriverNames }
    /// The drivers QEMU can create (`bdrv_co_create`); of them we create the registered
    /// ``ProtocolCreatable`` protocols and ``BlockdevCreatable`` formats.
    static var qemuCreateDrivers: Set<String> { ImageOpener.qemuCreatableDrivers.subtracting(["raw"]) }

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
    /// Storage of a protocol (a host file), created by the plan.
    case `protocol`(ProtocolCreatePlan)
    /// An image of a format, written onto `plan.file` (a node name or a `BlockdevRef`
    /// object, opened when the job runs).
    case format(BlockdevCreatePlan)

    static func parse(_ o: QMPArguments) throws -> QMPCreateRequest {
        let driver = try o.enumValue("driver", QMPMonitor.blockdevDriverNames)
        if let proto = ProtocolRegistry.driver(named: driver) as? any ProtocolCreatable.Type {
            let plan = try proto.readBlockdevCreateOptions(o)
            try o.done()
            try plan.check()
            return .protocol(plan)
        }
        if let format = FormatRegistry.driver(named: driver) as? any BlockdevCreatable.Type {
            let plan = try format.readBlockdevCreateOptions(o)
            try o.done()
            switch plan.file {
            case .string, .dict: break
            default: throw QMPError.generic("Invalid parameter type for '\(o.name("file"))', expected: BlockdevRef")
            }
            return .format(plan)
        }
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

/// The `create` job: runs one creation; progress is 0/1, then 1/1 (also on failure), as QEMU's.
// @unchecked: no mutable state: `request` and `graph` are immutable (the graph is thread-safe itself).
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
        case .protocol(let plan):
            try await plan.create()
        case .format(let plan):
            let (file, opened) = try await openFile(plan.file)
            do {
                // QEMU's order: the node, the options, the node's permissions, then the work.
                try plan.check()
                try checkPermissions(plan.file)
                if let refusal = plan.refusal { throw BlockError(.unsupported, refusal) }
                try await plan.create(file)
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
            // (Only a protocol whose storage blockdev-create makes can be opened here: a host file.)
            guard let proto = ProtocolRegistry.driver(named: driver) as? any ProtocolCreatable.Type else {
                throw BlockError(.unsupported, "blockdev-create: a new 'file' node may only use driver 'file' here")
            }
            let open = try proto.readCreateTarget(a)
            try a.done()
            return (try await open(), true)
        default:
            throw BlockError(.invalidArgument, "Invalid parameter type for 'options.file', expected: BlockdevRef")
        }
    }
}
