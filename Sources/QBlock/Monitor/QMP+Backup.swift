/// `blockdev-backup` and `drive-backup`: QBlock has no backup job yet. Both commands read
/// and check their arguments as QEMU 7.2 does (`BlockdevBackup` / `DriveBackup`), look up
/// the source (and `blockdev-backup`'s target node), and then fail with a GenericError
/// saying so — never accepting a backup they would not run.
extension QMPMonitor {
    func registerBackupCommands() {
        register("blockdev-backup") { args, ctx in
            let common = try QMPBackupArguments(args)
            let target = try args.string("target")
            try args.done()
            _ = try QMPBlockLookup.node(ctx.graph, device: common.device, nodeName: common.device)
            guard ctx.graph.node(named: target) != nil else { throw QMPError.noDevice(device: target, node: target) }
            throw QMPBackupArguments.unsupported("blockdev-backup")
        }
        register("drive-backup") { args, ctx in
            let common = try QMPBackupArguments(args)
            _ = try args.string("target")
            _ = try args.optionalString("format")
            _ = try args.optionalEnum("mode", ["existing", "absolute-paths"])
            try args.done()
            _ = try QMPBlockLookup.node(ctx.graph, device: common.device, nodeName: common.device)
            throw QMPBackupArguments.unsupported("drive-backup")
        }
    }
}

/// QAPI's `BackupCommon` members, read and type-checked.
struct QMPBackupArguments {
    let device: String

    init(_ args: QMPArguments) throws {
        _ = try args.optionalString("job-id")
        device = try args.string("device")
        _ = try args.enumValue("sync", ["top", "full", "none", "incremental", "bitmap"])
        _ = try args.optionalInt("speed")
        _ = try args.optionalString("bitmap")
        _ = try args.optionalEnum("bitmap-mode", ["on-success", "never", "always"])
        _ = try args.optionalBool("compress")
        _ = try args.optionalEnum("on-source-error", QMPJobs.onErrorValues)
        _ = try args.optionalEnum("on-target-error", QMPJobs.onErrorValues)
        _ = try args.optionalBool("auto-finalize")
        _ = try args.optionalBool("auto-dismiss")
        _ = try args.optionalString("filter-node-name")
        if let perf = try args.optionalObject("x-perf") {
            _ = try perf.optionalBool("use-copy-range")
            _ = try perf.optionalInt("max-workers")
            _ = try perf.optionalInt("max-chunk")
            try perf.done()
        }
    }

    static func unsupported(_ command: String) -> QMPError {
        .generic("\(command): backup jobs are not supported yet (QBlock has no backup job); use drive-mirror or blockdev-mirror with sync 'full' to copy a disk")
    }
}
