import Foundation
import Testing
import QBlock
@testable import QBlockCore
@testable import QBlockNBDWire
@testable import QBlockBitmaps
@testable import QBlockGraph
@testable import QBlockDrivers
@testable import QBlockOpen
@testable import QBlockOperations
@testable import QBlockJobs
@testable import QBlockNBDServer
@testable import QBlockMonitor
import TestSupport

/// blockdev-create, object-add/-del, query-qmp-schema, blockdev-reopen, x-blockdev-amend,
/// x-debug-query-block-graph: golden transcripts replayed on `nbd --qmp` and
/// qemu-storage-daemon 7.2 (every reply line compared), the files each made compared
/// (bytes, `qemu-img info`, `qemu-img check`), and in-process checks.
@Suite(.serialized)
struct QMPSurface2Tests {
    static let haveQSD = QMPHarness.ready && Tools.which("qemu-storage-daemon") != nil

    /// Replays `script` on a fresh daemon in `dir` (after `setup`) and returns its lines.
    static func transcript(daemon: [String], script: String, dir: TempDir,
                           setup: (TempDir) throws -> Void) throws -> [Substring] {
        try QMPHarness.transcript(daemon: daemon, script: script, dir: dir, setup: setup).split(separator: "\n")
    }

    /// Replays `script` on both daemons, compares every line, and returns both directories
    /// (ours, QEMU's) for checks of the files made; nil when qemu-storage-daemon is absent.
    static func compareWithQemu(_ script: String, setup: (TempDir) throws -> Void = { _ in }) throws -> (TempDir, TempDir)? {
        guard haveQSD else {
            print("QMPSurface2Tests: needs qemu-storage-daemon, python3 with qemu.qmp and the built nbd tool; skipped")
            return nil
        }
        let ourDir = TempDir("qmp2-ours"), qemuDir = TempDir("qmp2-qemu")
        let ours = try transcript(daemon: [Tools.executable("nbd") ?? "nbd", "--qmp", "$SOCK"], script: script, dir: ourDir, setup: setup)
        let qemu = try transcript(daemon: [Tools.which("qemu-storage-daemon") ?? "qemu-storage-daemon",
                                           "--chardev", "socket,path=$SOCK,server=on,wait=off,id=m0", "--monitor", "chardev=m0"],
                                  script: script, dir: qemuDir, setup: setup)
        #expect(ours.count == qemu.count)
        #expect(qemu.count > 3, "the script ran")
        for (i, (x, y)) in zip(ours, qemu).enumerated() {
            #expect(x == y, "line \(i + 1) differs:\nours: \(x)\nqemu: \(y)")
        }
        return (ourDir, qemuDir)
    }

    /// `qemu-img info --output=json` of `file`, its directory written as $DIR.
    static func info(_ dir: TempDir, _ file: String) throws -> String {
        try mustRun("qemu-img", "info", "--output=json", dir.file(file)).stdout.replacingOccurrences(of: dir.path, with: "$DIR")
    }

    /// The same file made by both daemons: same bytes, same `qemu-img info`, and for qcow2
    /// a clean `qemu-img check`.
    static func expectSameFile(_ name: String, _ ours: TempDir, _ qemu: TempDir) throws {
        let a = FileManager.default.contents(atPath: ours.file(name))
        let b = FileManager.default.contents(atPath: qemu.file(name))
        #expect(a != nil && a == b, "\(name): contents differ (\(a?.count ?? -1) vs \(b?.count ?? -1) bytes)")
        #expect(try info(ours, name) == info(qemu, name), "\(name): qemu-img info differs")
        if name.hasSuffix(".qcow2") {
            let r = try run("qemu-img", "check", ours.file(name))
            #expect(r.status == 0 && r.stdout.contains("No errors were found"), "\(name): \(r.stdout)")
        }
    }

    // MARK: - blockdev-create

    /// libvirt's flow (file, blockdev-add, qcow2 on the node, blockdev-add), qcow2 options
    /// (cluster size, lazy refcounts, refcount width, zstd, v2 with backing file,
    /// preallocation), file preallocation, JOB_STATUS_CHANGE sequences, query-jobs, job-dismiss,
    /// and the errors of the command and of the job.
    @Test func blockdevCreateMatchesQemuStorageDaemon() throws {
        guard let (ours, qemu) = try Self.compareWithQemu("transcript-create.jsonl") else { return }
        for name in ["a.qcow2", "b.qcow2", "c.qcow2", "d.qcow2", "e.raw", "f.raw", "g.raw"] {
            try Self.expectSameFile(name, ours, qemu)
        }
        // Not vacuous: the images are what was asked for.
        let b = try Self.info(ours, "b.qcow2")
        #expect(b.contains("\"cluster-size\": 4096") && b.contains("\"refcount-bits\": 8")
                && b.contains("\"compression-type\": \"zstd\"") && b.contains("\"lazy-refcounts\": true"))
        let c = try Self.info(ours, "c.qcow2")
        #expect(c.contains("\"compat\": \"0.10\"") && c.contains("\"backing-filename\": \"b.qcow2\""))
    }

    /// In process: the job's events, and a qcow2 written onto a node of the graph opens with
    /// the data written through it afterwards.
    @Test func blockdevCreateJobInProcess() async throws {
        let dir = TempDir("qmp2-create")
        let m = QMPMonitor()
        let events = m.subscribe()
        try await m.execute("blockdev-create", arguments: try Self.parse(#"{"job-id": "c", "options": {"driver": "file", "filename": "\#(dir.file("x.qcow2"))", "size": 0}}"#))
        var statuses: [String] = []
        for await e in events {
            guard case .dict(let d) = e, case .dict(let data)? = d["data"] else { continue }
            #expect(d["event"] == .string("JOB_STATUS_CHANGE"))
            if case .string(let s)? = data["status"] { statuses.append(s) }
            if statuses.last == "concluded" { break }
        }
        #expect(statuses == ["created", "running", "waiting", "pending", "concluded"])
        try await m.execute("job-dismiss", arguments: try Self.parse(#"{"id": "c"}"#))
        try await m.execute("blockdev-add", arguments: try Self.parse(#"{"driver": "file", "node-name": "xf", "filename": "\#(dir.file("x.qcow2"))"}"#))
        try await m.execute("blockdev-create", arguments: try Self.parse(#"{"job-id": "q", "options": {"driver": "qcow2", "file": "xf", "size": 1048576}}"#))
        let job = try #require(m.jobs.job("q"))
        await job.waitConcluded()
        #expect(job.error == nil)
        try await m.execute("blockdev-add", arguments: try Self.parse(#"{"driver": "qcow2", "node-name": "x", "file": "xf"}"#))
        let node = try #require(m.graph.node(named: "x"))
        #expect(node.length == 1 << 20)
        try await node.write(at: 4096, bytes: [UInt8](repeating: 0x5a, count: 512))
        await m.block.closeAll()
        let r = try mustRun("qemu-io", "-c", "read -P 0x5a 4096 512", "-c", "read -P 0 0 4096", dir.file("x.qcow2"))
        #expect(!r.stdout.contains("Pattern verification failed"))
        #expect(try run("qemu-img", "check", dir.file("x.qcow2")).status == 0)
    }

    // MARK: - object-add / object-del

    /// secret (data, file, base64), iothread, duplicate and unknown ids, refused types.
    @Test func objectsMatchQemuStorageDaemon() throws {
        _ = try Self.compareWithQemu("transcript-objects.jsonl") { dir in
            Array("secret1".utf8).withUnsafeBytes { _ = FileManager.default.createFile(atPath: dir.file("sec.txt"), contents: Data($0)) }
        }
    }

    /// In process: what a secret holds, query-iothreads, the refused types (not accepted
    /// and ignored: nothing is recorded).
    @Test func objectsInProcess() async throws {
        let m = QMPMonitor()
        try await m.execute("object-add", arguments: try Self.parse(#"{"qom-type": "secret", "id": "k", "data": "cGFzc3dvcmQ=", "format": "base64"}"#))
        #expect(m.objects.secret("k") == Array("password".utf8))
        try await m.execute("object-add", arguments: try Self.parse(#"{"qom-type": "secret", "id": "r", "data": "pw"}"#))
        #expect(m.objects.secret("r") == Array("pw".utf8))
        await #expect(throws: QMPError.generic("Encrypted secrets (keyid, iv) are not supported by this implementation")) {
            try await m.execute("object-add", arguments: try Self.parse(#"{"qom-type": "secret", "id": "e", "data": "x", "keyid": "k", "iv": "AAAA"}"#))
        }
        #expect(m.objects.secret("e") == nil)
        try await m.execute("object-add", arguments: try Self.parse(#"{"qom-type": "iothread", "id": "io0", "poll-max-ns": 100, "aio-max-batch": 7}"#))
        try await m.execute("object-add", arguments: try Self.parse(#"{"qom-type": "iothread", "id": "io1"}"#))
        guard case .list(let threads) = try await m.execute("query-iothreads"), threads.count == 2,
              case .dict(let t0) = threads[0], case .dict(let t1) = threads[1] else { Issue.record("query-iothreads"); return }
        #expect(t0["id"] == .string("io0") && t0["poll-max-ns"] == .int(100) && t0["aio-max-batch"] == .int(7))
        #expect(t1["id"] == .string("io1") && t1["poll-max-ns"] == .int(32768) && t1["poll-grow"] == .int(0))
        #expect(t0["thread-id"] == .int(Int64(getpid())))
        for (type, message) in [("throttle-group", "throttle-group objects are not supported by this implementation (no I/O throttling)"),
                                ("tls-creds-x509", "TLS credentials support requires GNUTLS"),
                                ("memory-backend-ram", "invalid object type: memory-backend-ram")] {
            await #expect(throws: QMPError.generic(message)) {
                try await m.execute("object-add", arguments: try Self.parse(#"{"qom-type": "\#(type)", "id": "t"}"#))
            }
        }
        await #expect(throws: QMPError.generic("object 't' not found")) {
            try await m.execute("object-del", arguments: try Self.parse(#"{"id": "t"}"#))
        }
        try await m.execute("object-del", arguments: try Self.parse(#"{"id": "io0"}"#))
        guard case .list(let after) = try await m.execute("query-iothreads") else { return }
        #expect(after.count == 1)
    }

    // MARK: - x-debug-query-block-graph

    /// Node and edge numbering and order, permissions of qcow2 (file, backing), raw and an
    /// export's backend, as qemu-storage-daemon reports them.
    @Test func blockGraphMatchesQemuStorageDaemon() throws {
        _ = try Self.compareWithQemu("transcript-graph.jsonl") { dir in
            try mustRun("qemu-img", "create", "-q", "-f", "qcow2", dir.file("base.qcow2"), "1M")
            try mustRun("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", dir.file("top.qcow2"))
            try truncateFile(dir.file("r.raw"), to: 1 << 20)
        }
    }

    // MARK: - query-qmp-schema

    /// The schema lists exactly the commands query-commands lists, every type it names is
    /// defined, and a few commands' argument members are what their handlers read.
    @Test func schemaDescribesEveryRegisteredCommand() async throws {
        let m = QMPMonitor()
        let registered = Set(m.commandNames + ["qmp_capabilities"])
        #expect(registered.subtracting(QMPSchema.commandNames).isEmpty,
                "commands without a schema entry: \(registered.subtracting(QMPSchema.commandNames).sorted())")
        guard case .list(let schema) = try await m.execute("query-qmp-schema"),
              case .list(let commands) = try await m.execute("query-commands") else { Issue.record("replies"); return }
        var byName: [String: QObject.Dict] = [:]
        for case .dict(let d) in schema { if case .string(let n)? = d["name"] { byName[n] = d } }
        let schemaCommands = Set(byName.values.filter { $0["meta-type"] == .string("command") }.compactMap { d -> String? in
            if case .string(let n)? = d["name"] { return n } else { return nil } })
        let listed = Set(commands.compactMap { c -> String? in
            if case .dict(let d) = c, case .string(let n)? = d["name"] { return n } else { return nil } })
        #expect(schemaCommands == listed)
        // Every reference resolves.
        for d in byName.values {
            var refs: [QObject?] = [d["arg-type"], d["ret-type"], d["element-type"]]
            if case .list(let ms)? = d["members"] { for case .dict(let md) in ms { refs.append(md["type"]) } }
            if case .list(let vs)? = d["variants"] { for case .dict(let vd) in vs { refs.append(vd["type"]) } }
            for case .string(let r)? in refs { #expect(byName[r] != nil, "\(d["name"] ?? .null) refers to undefined \(r)") }
        }
        // blockdev-create: job-id and options, options a union on driver with file and qcow2.
        guard case .string(let argType)? = byName["blockdev-create"]?["arg-type"], case .list(let members)? = byName[argType]?["members"]
        else { Issue.record("blockdev-create"); return }
        let names: [QObject] = members.compactMap { if case .dict(let d) = $0 { return d["name"] } else { return nil } }
        #expect(names == [QObject.string("job-id"), QObject.string("options")])

        // Handlers read exactly the schema's members: each member given alone (with a wrong
        // type) is never "unexpected"; a member not in the schema is.
        for command in ["blockdev-del", "block_resize", "block-dirty-bitmap-add", "object-del", "blockdev-create",
                        "block-export-del", "block-set-write-threshold", "query-named-block-nodes", "x-debug-block-dirty-bitmap-sha256",
                        "blockdev-snapshot-sync", "block-job-set-speed", "nbd-server-stop", "query-iothreads"] {
            let schemaMembers = try #require(QMPSchema.argumentMembers(command) ?? (byName[command] != nil ? [] : nil), "\(command)")
            for member in schemaMembers {
                do {
                    try await m.execute(command, arguments: QObject.Dict([(member.name, .list([]))]))
                } catch let e as QMPError {
                    #expect(e.desc != "Parameter '\(member.name)' is unexpected", "\(command): \(member.name) is in the schema")
                }
            }
            let mandatory = schemaMembers.filter { !$0.optional }
            if mandatory.isEmpty {
                await #expect(throws: QMPError.generic("Parameter 'not-a-member' is unexpected"), "\(command)") {
                    try await m.execute(command, arguments: QObject.Dict([("not-a-member", .int(1))]))
                }
            }
        }
    }

    static func parse(_ json: String) throws -> QObject.Dict {
        guard case .dict(let d) = try QObject.parseJSON(json) else { throw QMPTestError(description: "not an object: \(json)") }
        return d
    }
}
