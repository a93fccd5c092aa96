/// The command groups every ``QMPMonitor`` registers, in order.
///
/// This list is the one place a new group is hooked in: write
/// `extension QMPMonitor { func registerFooCommands() { register("foo") { … } } }` in its
/// own file (`QMP+Foo.swift`) and add one line here. See docs/qmp.md.
extension QMPMonitor {
    static let standardGroups: [@Sendable (QMPMonitor) -> Void] = [
        { $0.registerCoreCommands() },
        { $0.registerBlockCommands() },
        { $0.registerNBDCommands() },
        { $0.registerSnapshotCommands() },
        { $0.registerBitmapCommands() },
        { $0.registerTransactionCommands() },
        { $0.registerJobCommands() },
        { $0.registerMirrorCommands() },
        { $0.registerBlockQueryCommands() },
        { $0.registerBackupCommands() },
        { $0.registerInternalSnapshotCommands() },
        { $0.registerDebugCommands() },
        { $0.registerCreateCommands() },
        { $0.registerAmendCommands() },
        { $0.registerReopenCommands() },
        { $0.registerObjectCommands() },
        { $0.registerSchemaCommands() },
        { $0.registerBlockGraphCommands() },
    ]
}
