import QBlockCore
import QBlockDrivers
import QBlockGraph
import QBlockOpen

/// The filters `blockdev-add` builds from children it opens itself (QEMU's `blkdebug` and
/// `blkverify`); ``QMPBlockdevDrivers`` consults them after the filters registered at run time.
extension QMPBlockdevDrivers {
    /// The built-in filter openers by driver name.
    static let builtInFilters: [String: Opener] = [
        "blkdebug": { args, ctx in try await openBlkdebug(args, ctx) },
        "blkverify": { args, ctx in try await openBlkverify(args, ctx) },
    ]

    /// QEMU's `BlockdevOptionsBlkdebug`: `image`, `config`, `align`, `max-transfer`,
    /// `opt-write-zero`, `max-write-zero`, `opt-discard`, `max-discard` (the last three only
    /// checked for their type), `inject-error` and `set-state` (lists of rules, after the
    /// config file's), `take-child-perms` and `unshare-child-perms` (accepted, ignored).
    static func openBlkdebug(_ args: QMPArguments, _ ctx: QMPOpenContext) async throws -> any BlockDriver {
        let config = try args.optionalString("config")
        // (Sizes: `file.align=4k` from an option string, as blkdebug's QemuOpts take them.)
        let align = try args.optionalSize("align") ?? 0
        let maxTransfer = try args.optionalSize("max-transfer") ?? 0
        let optWriteZero = try args.optionalSize("opt-write-zero") ?? 0
        let maxWriteZero = try args.optionalSize("max-write-zero") ?? 0
        for k in ["opt-discard", "max-discard"] { _ = try args.optionalSize(k) }
        var rules = try config.map { try BlkdebugProtocol.readConfigFile($0) } ?? []
        for (key, group, members) in [("inject-error", "inject-error", ["event", "state", "iotype", "errno", "sector", "once", "immediately"]),
                                      ("set-state", "set-state", ["event", "state", "new_state"])] {
            // (-drive style options may give one rule as an object: `inject-error.event=…`,
            // as QEMU's blkdebug reads its option groups.)
            var items: [QObject]
            if args.keyval, case .dict(let one)? = args.dict[key] {
                _ = args.value(key)
                items = [.dict(one)]
            } else {
                items = try args.optionalList(key) ?? []
            }
            for (i, item) in items.enumerated() {
                guard case .dict(let d) = item else {
                    throw QMPError.generic("Invalid parameter type for '\(args.name(key)).\(i)', expected: object")
                }
                let o = QMPArguments(d, path: "\(args.name(key))[\(i)]")
                var fields: [(String, String)] = []
                for m in members {
                    guard let v = o.value(m) else { continue }
                    switch v {
                    case .string(let s): fields.append((m, s))
                    case .int(let n): fields.append((m, String(n)))
                    case .bool(let b): fields.append((m, b ? "on" : "off"))
                    default: throw QMPError.generic("Invalid parameter type for '\(o.name(m))'")
                    }
                }
                if group == "set-state" && o.dict["new_state"] == nil { throw o.missing("new_state") }
                if o.dict["event"] == nil { throw o.missing("event") }
                try o.done()
                rules.append(try BlkdebugConfig.rule(group: group, fields: fields))
            }
        }
        _ = try args.optionalStringList("take-child-perms")
        _ = try args.optionalStringList("unshare-child-perms")
        let image = try await ctx.child(args, "image")
        try args.done()
        let node = try BlkdebugNode(image: image, rules: rules, configFile: config, align: Int(align),
                                    maxTransfer: Int(maxTransfer), optWriteZero: Int(optWriteZero), maxWriteZero: Int(maxWriteZero))
        await node.receiveDebugEvent(.none)   // QEMU reports `none` once, at open
        return node
    }

    /// QEMU's `BlockdevOptionsBlkverify`: `raw` and `test`, opened in that order.
    static func openBlkverify(_ args: QMPArguments, _ ctx: QMPOpenContext) async throws -> any BlockDriver {
        let raw = try await ctx.child(args, "raw")
        let test = try await ctx.child(args, "test")
        try args.done()
        return BlkverifyNode(test: test, raw: raw)
    }
}
