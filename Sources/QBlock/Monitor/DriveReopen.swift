import QBlockCore
import QBlockDrivers
import QBlockGraph

/// qemu-io's `reopen [-r|-w] [-c cache] [-o options]` on an open image tree (QEMU's
/// `bdrv_reopen` with `keep_old_opts`): the options given are laid over those the image
/// was opened with, level by level (`file.…` for the file child, `backing.…` for the
/// backing node, and so on down), and each level is checked as QEMU's
/// `bdrv_reopen_prepare` checks it:
///
/// - the block layer's own options: `read-only`, `auto-read-only`, `cache.direct`,
///   `cache.no-flush` must be booleans; the mode and cache of the image and its file change;
/// - the driver's options that may change: qcow2's `lazy-refcounts`, cache sizes and
///   `pass-discard-*` (``Qcow2RuntimeOptions``, which also takes `overlap-check=none` and
///   `cache-clean-interval=0` and refuses the checks and cleaning it does not do), raw's
///   `offset` and `size`;
/// - every other option must keep its value: "Cannot change the option 'driver'".
///
/// The top's `discard` mode changes (``Outcome/unmap``, for the tool to apply). Options QEMU
/// could change that this implementation cannot (file's `drop-cache`, `detect-zeroes`, the `discard` of a node
/// below the top, the mode of a node below the top) are refused with a message saying so
/// when their value would change.
public enum DriveReopen {
    /// What qemu-io's `reopen` was given.
    public struct Request: Sendable {
        /// The `-o` options, dotted keys with string values (several `-o` merged).
        public var options: QObject.Dict
        /// `-r` (true) or `-w` (false); nil keeps the mode.
        public var readOnly: Bool?
        /// `-c`; nil keeps the cache mode.
        public var cache: CacheMode?

        /// A request; every parameter is the property of the same name.
        public init(options: QObject.Dict = QObject.Dict(), readOnly: Bool? = nil, cache: CacheMode? = nil) {
            self.options = options
            self.readOnly = readOnly
            self.cache = cache
        }
    }

    /// One node of the tree and its options.
    private struct Level {
        let prefix: String
        let driver: any BlockDriver
        var given: QObject.Dict
        var old: QObject.Dict
        var isBacking: Bool
        /// The options after the reopen (given over old).
        var merged: QObject.Dict {
            var m = old
            for (k, v) in given.entries { m[k] = v }
            return m
        }
    }

    /// The block layer's own boolean options (QEMU's `bdrv_runtime_opts`).
    private static let layerBools = ["read-only", "auto-read-only", "cache.direct", "cache.no-flush", "force-share"]
    /// Options QEMU's drivers take on reopen that this implementation cannot change.
    private static let unchangeable: [String: Set<String>] = [
        "file": ["drop-cache", "x-check-cache-dropped"],
        "host_device": ["drop-cache", "x-check-cache-dropped"],
    ]

    /// What a successful reopen leaves for the tool to keep.
    public struct Outcome: Sendable {
        /// The options to lay the next reopen over (dotted keys).
        public var options: QObject.Dict
        /// The top's new discard mode (`discard=unmap`: true, `ignore`: false); nil: unchanged.
        public var unmap: Bool?
    }

    /// Reopens the image under `top` as qemu-io's `reopen` does.
    /// - Parameters:
    ///   - top: the image as the tool holds it (filters above the format are looked through).
    ///   - opened: the options it was opened (or last reopened) with, dotted keys.
    ///   - request: what `reopen` was given.
    ///   - currentCache: the cache mode in use (for the levels `-c` and `cache.*` leave alone).
    /// - Returns: the options to remember for the next reopen and the top's discard mode.
    /// - Throws: ``QMPError`` with QEMU's messages ("Cannot change the option 'driver'",
    ///   "Cannot set both -r/-w and 'read-only'", …), the drivers' errors when the change
    ///   itself fails (the image then keeps its previous mode where it could be restored).
    public static func reopen(_ top: any BlockDriver, opened: QObject.Dict, request: Request,
                              currentCache: CacheMode) async throws -> Outcome {
        let given = DriveOptions.flatten(request.options)
        if given["read-only"] != nil && request.readOnly != nil {
            throw QMPError.generic("Cannot set both -r/-w and 'read-only'")
        }
        if (given["cache.direct"] != nil || given["cache.no-flush"] != nil) && request.cache != nil {
            throw QMPError.generic("Cannot set both -c and the cache options")
        }
        let format = top.skippingFilters.innermostDriver
        var levels: [Level] = []
        collect(format, prefix: "", given: given, old: DriveOptions.flatten(opened), isBacking: false, into: &levels)

        // The top level: the mode and cache the request asks for, as qemu-io adds them.
        var cache = request.cache ?? currentCache
        var readOnly = request.readOnly ?? format.isReadOnly
        for i in levels.indices { try checkLayerOptions(levels[i]) }
        let topMerged = levels[0].merged
        if let v = topMerged["read-only"], given["read-only"] != nil { readOnly = try bool(v, "read-only") }
        if given["cache.direct"] != nil || given["cache.no-flush"] != nil {
            let direct = try topMerged["cache.direct"].map { try bool($0, "cache.direct") } ?? false
            let noFlush = try topMerged["cache.no-flush"].map { try bool($0, "cache.no-flush") } ?? false
            if direct && noFlush {
                throw QMPError.generic("reopen: cache.direct=on with cache.no-flush=on is not supported by this implementation")
            }
            cache = noFlush ? .unsafe : direct ? (currentCache.writeThrough ? .directsync : .none)
                : (currentCache.writeThrough ? .writethrough : .writeback)
        }

        if let fileLevel = levels.first(where: { $0.prefix == "file." }), let v = fileLevel.given["read-only"],
           try bool(v, "read-only") {
            if !readOnly {
                let r = Int.random(in: 0..<100)
                let name = (format.file as? BlockNode)?.nodeName ?? "#block0\(r < 10 ? "0" : "")\(r)"
                throw QMPError.generic("Read-only block node '\(name)' cannot support read-write users")
            }
        }

        // Each level's driver options, then the options that must stay as they are.
        var actions: [() async throws -> Void] = []
        for level in levels {
            if let action = try prepare(level) { actions.append(action) }
        }

        // qemu-io drops the image's write permission only for -r: read-only=on as an option
        // leaves a writer that the read-only node cannot have.
        if readOnly && request.readOnly == nil && !format.isReadOnly {
            let r = Int.random(in: 0..<100)
            let name = (top as? BlockNode)?.nodeName ?? "#block1\(r < 10 ? "0" : "")\(r)"
            throw QMPError.generic("Read-only block node '\(name)' cannot support read-write users")
        }
        guard let f = format as? any ReopenableDriver else {
            throw QMPError.generic("Block format '\(format.driverName)' used by device '' does not support reopening files")
        }
        let file = format.file?.innermostDriver as? any ReopenableDriver
        if readOnly {
            try await f.reopen(readOnly: true, cache: cache)
            try await file?.reopen(readOnly: true, cache: cache)
        } else {
            try await file?.reopen(readOnly: false, cache: cache)
            try await f.reopen(readOnly: false, cache: cache)
        }
        for action in actions { try await action() }

        // What the next reopen keeps: the options given over the old ones, without the
        // mode and cache qemu-io adds itself.
        var next = DriveOptions.flatten(opened)
        for (k, v) in given.entries where !["read-only", "cache.direct", "cache.no-flush"].contains(k) { next[k] = v }
        var unmap: Bool?
        if case .string(let d)? = given["discard"] { unmap = d == "unmap" || d == "on" }
        return Outcome(options: next, unmap: unmap)
    }

    /// The levels of the tree below `driver` in QEMU's reopen order: a node, then its
    /// backing node's subtree, then its file's.
    private static func collect(_ driver: any BlockDriver, prefix: String, given: QObject.Dict, old: QObject.Dict,
                                isBacking: Bool, into levels: inout [Level]) {
        var mine = given, mineOld = old
        var children: [(String, any BlockDriver, QObject.Dict, QObject.Dict)] = []
        for (name, child) in [("backing", driver.backing), ("file", driver.file)] {
            guard let child = child?.innermostDriver else { continue }
            let (sub, rest) = extract(mine, "\(name).")
            let (subOld, restOld) = extract(mineOld, "\(name).")
            mine = rest
            mineOld = restOld
            children.append((name, child, sub, subOld))
        }
        levels.append(Level(prefix: prefix, driver: driver, given: mine, old: mineOld, isBacking: isBacking))
        for (name, child, sub, subOld) in children {
            collect(child, prefix: "\(prefix)\(name).", given: sub, old: subOld, isBacking: name == "backing", into: &levels)
        }
    }

    /// The members of `dict` under `prefix` (without it), and the others.
    private static func extract(_ dict: QObject.Dict, _ prefix: String) -> (QObject.Dict, QObject.Dict) {
        var inside = QObject.Dict(), outside = QObject.Dict()
        for (k, v) in dict.entries {
            if k.hasPrefix(prefix) { inside[String(k.dropFirst(prefix.count))] = v } else { outside[k] = v }
        }
        return (inside, outside)
    }

    private static func bool(_ v: QObject, _ key: String) throws -> Bool {
        switch v {
        case .bool(let b): return b
        case .string(let s): if let b = KeyvalValue.bool(s) { return b }
        default: break
        }
        throw QMPError.generic("Parameter '\(key)' expects 'on' or 'off'")
    }

    /// QEMU's checks of the block layer's options of one level (`bdrv_runtime_opts`).
    private static func checkLayerOptions(_ level: Level) throws {
        let merged = level.merged
        for (k, v) in merged.qemuOrdered where layerBools.contains(k) { _ = try bool(v, k) }
        if case .string(let d)? = merged["discard"], !["ignore", "off", "unmap", "on"].contains(d) {
            throw QMPError.generic("Invalid discard option")
        }
        // A mode asked for below the top level (the top's is the request's).
        if !level.prefix.isEmpty {
            for key in ["read-only", "cache.direct", "cache.no-flush"] {
                // (The format's file made read-only under a writable format: QEMU's
                // permission error, from reopen(_:opened:request:currentCache:).)
                if key == "read-only", level.prefix == "file.", let v = level.given[key], (try? bool(v, key)) == true { continue }
                if let v = level.given[key], v != level.old[key] {
                    throw QMPError.generic("reopen: changing '\(level.prefix)\(key)' is not supported by this implementation")
                }
            }
        }
        for key in ["discard", "detect-zeroes"] {
            // (The top's discard mode changes: the tool passes discards on or drops them.)
            if key == "discard" && level.prefix.isEmpty { continue }
            if let v = level.given[key], v != level.old[key] {
                throw QMPError.generic("reopen: changing '\(level.prefix)\(key)' is not supported by this implementation")
            }
        }
    }

    /// Checks one level's driver options and the options that must keep their values;
    /// returns the change to make for the driver's options (nil: none).
    private static func prepare(_ level: Level) throws -> (() async throws -> Void)? {
        let merged = level.merged
        let node = level.driver
        let driverName = node.driverName
        var consumed: Set<String> = Set(layerBools + ["discard", "detect-zeroes"])
        var action: (() async throws -> Void)?
        let args = QMPArguments(merged, keyval: true)
        switch node {
        case let q as Qcow2Node:
            let options = try Qcow2RuntimeOptions.read(args)
            consumed.formUnion(Qcow2RuntimeOptions.keys)
            if options != q.runtimeOptions { action = { try await q.reopen(options: options) } }
        case let r as RawNode:
            let offset = Int64(bitPattern: try args.optionalUInt("offset", bits: 64) ?? 0)
            let size = try args.optionalUInt("size", bits: 64).map { Int64(bitPattern: $0) }
            consumed.formUnion(["offset", "size"])
            try RawNode.checkWindow(offset: offset, size: size, fileLength: (r.child.length + 511) / 512 * 512)
            action = { try r.setWindow(offset: offset, size: size) }
        default:
            break
        }
        for key in unchangeable[driverName] ?? [] {
            let changed = merged.entries.contains { ($0.key == key || $0.key.hasPrefix(key + ".")) && $0.value != level.old[$0.key] }
            if changed {
                throw QMPError.generic("reopen: changing '\(level.prefix)\(key)' of a \(driverName) node is not supported by this implementation")
            }
        }
        // The rest must be unchanged; the node's driver and its file name are options it has.
        var current = level.old
        if current["driver"] == nil { current["driver"] = .string(driverName) }
        if current["filename"] == nil, node.file == nil {
            current["filename"] = .string(node.filename)
        }
        for (k, v) in merged.qemuOrdered where !consumed.contains(k) {
            if v != current[k] { throw QMPError.generic("Cannot change the option '\(k)'") }
        }
        return action
    }
}
