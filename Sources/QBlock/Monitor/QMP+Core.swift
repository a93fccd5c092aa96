import QBlockCore
/// The protocol's own commands: `query-version`, `query-commands`, `quit`
/// (`qmp_capabilities` is handled by the dispatcher, per session).
extension QMPMonitor {
    func registerCoreCommands() {
        register("query-version", exclusive: false) { args, ctx in
            try args.done()
            return ctx.monitor.versionObject
        }
        register("query-commands", exclusive: false) { args, ctx in
            try args.done()
            let names = ["qmp_capabilities"] + ctx.monitor.commandNames
            return .list(names.reversed().map { .dict(QObject.Dict([("name", .string($0))])) })
        }
        register("quit", exclusive: false) { args, _ in
            try args.done()
            return .dict(QObject.Dict())
        }
    }
}
