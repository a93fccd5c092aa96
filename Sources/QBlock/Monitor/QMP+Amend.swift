import QBlockCore
import QBlockGraph
import QBlockJobs
/// `x-blockdev-amend` (QEMU 7.2's `qapi/block-core.json`, `BlockdevAmendOptions`): changes
/// options of an open image as a job of type `amend` (`auto-finalize` on, `auto-dismiss`
/// off, progress 0/1 then 1/1, as `blockdev-create`).
///
/// In QEMU 7.2 the command can only change encryption: the `qcow2` branch has one member,
/// `encrypt` (LUKS key slots), and the `luks` branch the same LUKS members. Without
/// `encrypt` a qcow2 amend changes nothing and succeeds, as in QEMU. With `encrypt`, QEMU
/// fails the job unless the image is LUKS-encrypted; QBlock never opens an encrypted qcow2
/// image (`blockdev-add` refuses it), so on every node it can hold the job fails with
/// QEMU's "image is not encrypted" — the answer QEMU gives for the same node. Nothing is
/// accepted and then ignored. The version, refcount width, lazy refcounts and size that
/// `img amend` changes are not members of the QMP command in 7.2 ("… is unexpected").
extension QMPMonitor {
    /// Drivers QEMU's schema names but a stock qemu-storage-daemon does not load (they are
    /// modules of the separate qemu-block-extra package, or not built): "not found".
    static let amendUnavailableDrivers: Set<String> = ["blkreplay", "ftp", "ftps", "gluster", "http", "https",
                                                       "iscsi", "nfs", "rbd", "ssh"]

    func registerAmendCommands() {
        register("x-blockdev-amend") { args, ctx in
            let jobID = try args.string("job-id")
            let nodeName = try args.string("node-name")
            let request = try QMPAmendRequest.parse(try args.object("options"))
            let force = try args.bool("force", default: false)
            try args.done()
            // QEMU's order: the node, the driver, the node's driver, the driver's amend support, the job.
            guard let node = ctx.graph.node(named: nodeName) else {
                throw QMPError.generic("Cannot find device='' nor node-name='\(nodeName)'")
            }
            if QMPMonitor.amendUnavailableDrivers.contains(request.driver) {
                throw QMPError.generic("Block driver '\(request.driver)' not found or not supported")
            }
            if node.driverName != request.driver {
                throw QMPError.generic("x-blockdev-amend doesn't support changing the block driver")
            }
            guard request.driver == "qcow2" else {
                throw QMPError.generic("Driver does not support x-blockdev-amend")
            }
            let job = try ctx.monitor.jobs.createForQMP(BlockdevAmendJob(node: node, request: request, force: force),
                                                        options: JobOptions(id: jobID, autoFinalize: true, autoDismiss: false))
            ctx.monitor.jobs.start(job)
            return .dict(QObject.Dict())
        }
    }
}

/// A checked `x-blockdev-amend` `options` member.
struct QMPAmendRequest: Sendable {
    /// QAPI's `QCryptoBlockAmendOptions`: `format` qcow (no members) or luks.
    enum Encryption: Sendable, Equatable {
        case qcow
        case luks(active: Bool, newSecret: String?, oldSecret: String?, keyslot: Int64?, iterTime: Int64?, secret: String?)
    }

    let driver: String
    /// The `encrypt` member of the qcow2 branch (the whole of the luks branch).
    let encrypt: Encryption?

    static func parse(_ o: QMPArguments) throws -> QMPAmendRequest {
        let driver = try o.enumValue("driver", QMPMonitor.blockdevDriverNames)
        var encrypt: Encryption?
        switch driver {
        case "qcow2":
            if let e = try o.optionalObject("encrypt") {
                let format = try e.enumValue("format", ["qcow", "luks"])
                encrypt = format == "qcow" ? .qcow : try luks(e)
                try e.done()
            }
        case "luks":
            encrypt = try luks(o)
        default:
            break
        }
        try o.done()
        return QMPAmendRequest(driver: driver, encrypt: encrypt)
    }

    /// `QCryptoBlockAmendOptionsLUKS`, in the schema's member order.
    private static func luks(_ o: QMPArguments) throws -> Encryption {
        let state = try o.enumValue("state", ["active", "inactive"])
        return .luks(active: state == "active", newSecret: try o.optionalString("new-secret"),
                     oldSecret: try o.optionalString("old-secret"), keyslot: try o.optionalInt("keyslot"),
                     iterTime: try o.optionalInt("iter-time"), secret: try o.optionalString("secret"))
    }
}

/// The `amend` job: one amendment of a qcow2 node; progress 0/1, then 1/1 (also on failure).
// @unchecked: no mutable state: `node`, `request` and `force` are immutable.
final class BlockdevAmendJob: JobDriver, @unchecked Sendable {
    // @unchecked: immutable after init; the node is thread-safe.
    /// Held for the job's life, as QEMU takes a reference on it.
    let node: BlockNode
    let request: QMPAmendRequest
    let force: Bool
    var jobType: JobType { .amend }

    init(node: BlockNode, request: QMPAmendRequest, force: Bool) {
        self.node = node
        self.request = request
        self.force = force
    }

    func run(_ job: Job) async throws {
        job.setProgressTotal(1)
        defer { job.progressDone(1) }
        guard request.encrypt != nil else { return }   // nothing to change: QEMU succeeds too
        // Encrypted qcow2 images are refused when opened, so this node is not encrypted.
        throw BlockError(.unsupported, "image is not encrypted, can't amend")
    }
}
