#if canImport(Glibc)
import Glibc
#endif
import QBlockCore
import QBlockGraph

/// One action of a `transaction` (QEMU's `TransactionActionDrv`): ``prepare()`` does
/// everything that can fail, outside the drained section when it can (creating and opening
/// overlays); ``commitDrained()`` runs with every user of the graph drained and must be quick;
/// ``commit()`` finishes; ``abort()`` undoes a successful ``prepare()``.
///
/// Every step is a requirement without a default: an action states what it does at each
/// one, even when that is nothing, so that a new action cannot forget a step.
///
/// Other command groups add action types with ``QMPMonitor/registerTransactionAction(_:make:)``.
public protocol QMPTransactionAction: AnyObject {
    /// Everything that can fail, before writers are held.
    func prepare() async throws
    /// Work that must happen while writers are held, and may still fail (a flush).
    func prepareDrained() async throws
    /// The switch itself, writers held: never fails.
    func commitDrained()
    /// After the switch, writers running again.
    func commit() async
    /// Undoes a successful ``prepare()``.
    func abort() async
}

/// Transaction action types added by other command groups.
// @unchecked: `makers` is only touched with `lock` held.
final class QMPTransactionRegistry: @unchecked Sendable {
    let lock = PosixMutex()
    var makers: [String: @Sendable (QMPArguments, QMPContext) throws -> QMPTransactionAction] = [:]
}

/// Runs actions all or none: every action is prepared; then, with the graph drained, each
/// action's drained preparation runs and, if all succeeded, each commits; on any failure the
/// prepared actions are aborted in reverse order and the graph and files are as before.
enum QMPTransaction {
    /// - Parameter drain: false for actions that only touch bitmaps (no writer is held).
    static func run(_ actions: [QMPTransactionAction], graph: BlockGraph, drain: Bool = true) async throws {
        var prepared: [QMPTransactionAction] = []
        do {
            for a in actions {
                try await a.prepare()
                prepared.append(a)
            }
            if drain {
                let t0 = Trace.now()
                var t1 = t0, t2 = t0
                try await graph.drained {
                    t1 = Trace.now()
                    for a in actions { try await a.prepareDrained() }
                    t2 = Trace.now()
                    for a in actions { a.commitDrained() }
                }
                Trace.log("transaction: drain \(t1 - t0) us, drained work \(t2 - t1) us, switch+undrain \(Trace.now() - t2) us")
            } else {
                for a in actions { try await a.prepareDrained() }
                for a in actions { a.commitDrained() }
            }
        } catch {
            for a in prepared.reversed() { await a.abort() }
            throw error
        }
        for a in actions { await a.commit() }
    }
}

extension QMPMonitor {
    /// Adds action `type` to `transaction` (e.g. `drive-backup` from the jobs group): `make`
    /// reads the action's `data` (call ``QMPArguments/done()``) and returns the action.
    public func registerTransactionAction(_ type: String,
                                          make: @escaping @Sendable (QMPArguments, QMPContext) throws -> QMPTransactionAction) {
        let r = state(QMPTransactionRegistry.self) { QMPTransactionRegistry() }
        r.lock.withLock { r.makers[type] = make }
    }

    /// Builds the transaction action for `type` with arguments `data`.
    func transactionAction(type: String, data: QMPArguments, context: QMPContext) throws -> QMPTransactionAction {
        let r = state(QMPTransactionRegistry.self) { QMPTransactionRegistry() }
        if let make = r.lock.withLock({ r.makers[type] }) { return try make(data, context) }
        switch type {
        case "blockdev-snapshot-sync": return try SnapshotSyncAction(data, monitor: self)
        case "blockdev-snapshot": return try SnapshotAction(data, monitor: self)
        case "block-dirty-bitmap-add": return try BitmapAddAction(data, graph: graph, block: block)
        case "block-dirty-bitmap-remove": return try BitmapSimpleAction(.remove, data, graph: graph)
        case "block-dirty-bitmap-clear": return try BitmapSimpleAction(.clear, data, graph: graph)
        case "block-dirty-bitmap-enable": return try BitmapSimpleAction(.enable, data, graph: graph)
        case "block-dirty-bitmap-disable": return try BitmapSimpleAction(.disable, data, graph: graph)
        case "block-dirty-bitmap-merge": return try BitmapMergeAction(data, graph: graph)
        default: throw QMPError.generic("Parameter 'type' does not accept value '\(type)'")
        }
    }

    static let transactionTypes = ["abort", "block-dirty-bitmap-add", "block-dirty-bitmap-remove", "block-dirty-bitmap-clear",
                                   "block-dirty-bitmap-enable", "block-dirty-bitmap-disable", "block-dirty-bitmap-merge",
                                   "blockdev-backup", "blockdev-snapshot", "blockdev-snapshot-internal-sync",
                                   "blockdev-snapshot-sync", "drive-backup"]

    func registerTransactionCommands() {
        register("transaction") { args, ctx in
            let list = try args.list("actions")
            if let props = try args.optionalObject("properties") {
                _ = try props.optionalEnum("completion-mode", ["individual", "grouped"])
                try props.done()
            }
            try args.done()
            var actions: [QMPTransactionAction] = []
            for (i, item) in list.enumerated() {
                guard case .dict(let d) = item else {
                    throw QMPError.generic("Invalid parameter type for 'actions[\(i)]', expected: object")
                }
                let a = QMPArguments(d)
                let registry = ctx.monitor.state(QMPTransactionRegistry.self) { QMPTransactionRegistry() }
                let extra = registry.lock.withLock { Array(registry.makers.keys) }
                let type = try a.enumValue("type", QMPMonitor.transactionTypes + extra)
                if type == "abort" {
                    _ = try a.optionalObject("data")
                    try a.done()
                    actions.append(AbortAction())
                    continue
                }
                let data = try a.optionalObject("data") ?? QMPArguments(QObject.Dict(), path: "data")
                try a.done()
                actions.append(try ctx.monitor.transactionAction(type: type, data: data, context: ctx))
            }
            try await QMPTransaction.run(actions, graph: ctx.graph)
            return .dict(QObject.Dict())
        }
    }
}

/// The `abort` action: fails the transaction on purpose (QEMU's test of rollback). Its
/// preparation always fails, so no later step ever runs for it.
final class AbortAction: QMPTransactionAction {
    func prepare() async throws { throw QMPError.generic("Transaction aborted using Abort action") }
    /// Never reached: ``prepare()`` failed.
    func prepareDrained() async throws {}
    /// Never reached: ``prepare()`` failed.
    func commitDrained() {}
    /// Never reached: ``prepare()`` failed.
    func commit() async {}
    /// Never reached: a failed preparation is not aborted.
    func abort() async {}
}
