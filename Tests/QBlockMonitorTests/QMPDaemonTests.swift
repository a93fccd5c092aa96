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

/// `nbd --qmp` driven by the real `qemu.qmp` client: the wire protocol, and live snapshots
/// under a writer going through an NBD export, checked byte for byte and with qemu-img.
@Suite(.serialized, .enabled(if: QMPHarness.ready, Comment(rawValue: QMPHarness.missing)))
struct QMPDaemonTests {
    @Test func protocolChecksWithQemuQmp() throws {
        let dir = TempDir("qmp-proto")
        try truncateFile(dir.file("ev.raw"), to: 16 << 20)
        let d = try QMPHarness.startDaemon(dir: dir)
        defer { d.stop() }
        let r = try run(Tools.which("python3") ?? "python3", ["\(QMPHarness.pythonDir)/qmp_protocol.py", d.socket, dir.file("ev.raw")])
        #expect(r.status == 0, "\(r)")
        #expect(r.stdout.contains("0 failed"), "\(r)")
    }

    /// Opens `name` (qcow2) as node `name` and exports it writable under the same name.
    private func addDisk(_ py: PyQMP, _ dir: TempDir, _ name: String) async throws {
        try await py.ok("blockdev-add", ["driver": "qcow2", "node-name": name,
                                         "file": ["driver": "file", "filename": dir.file("\(name).qcow2")]])
        try await py.ok("block-export-add", ["type": "nbd", "id": "e-\(name)", "node-name": name, "writable": true, "name": name])
    }

    private func exportNodes(_ py: PyQMP) async throws -> [String: String] {
        let list = try await py.ok("query-block-exports") as? [[String: Any]] ?? []
        var m: [String: String] = [:]
        for e in list { m[e["id"] as? String ?? ""] = e["node-name"] as? String }
        return m
    }

    @Test func liveSnapshotUnderWriter() async throws {
        let dir = TempDir("qmp-snap")
        try mustRun("qemu-img", "create", "-q", "-f", "qcow2", dir.file("d0.qcow2"), "8M")
        let d = try QMPHarness.startDaemon(dir: dir)
        defer { d.stop() }
        let py = try PyQMP(socket: d.socket)
        try await py.ok("nbd-server-start", ["addr": ["type": "unix", "data": ["path": dir.file("nbd.sock")]]])
        try await addDisk(py, dir, "d0")
        let writer = try await ModelWriter(uri: "nbd+unix:///d0?socket=\(dir.file("nbd.sock"))", blocks: 2048)
        writer.start(seed: 1)
        try await Task.sleep(nanoseconds: 300_000_000)
        try await py.ok("blockdev-snapshot-sync", ["node-name": "d0", "snapshot-file": dir.file("s1.qcow2"),
                                                   "snapshot-node-name": "s1", "format": "qcow2"])
        #expect(try await exportNodes(py)["e-d0"] == "s1")
        let before = writer.writes
        try await Task.sleep(nanoseconds: 200_000_000)
        // A second snapshot with an overlay node added beforehand (blockdev-snapshot).
        try mustRun("qemu-img", "create", "-q", "-f", "qcow2", dir.file("s2.qcow2"), "8M")
        try await py.ok("blockdev-add", ["driver": "qcow2", "node-name": "s2", "backing": NSNull(),
                                         "file": ["driver": "file", "filename": dir.file("s2.qcow2")]])
        try await py.ok("blockdev-snapshot", ["node": "s1", "overlay": "s2"])
        #expect(try await exportNodes(py)["e-d0"] == "s2")
        try await Task.sleep(nanoseconds: 200_000_000)
        let failure = await writer.stop()
        #expect(failure == nil, "writer failed: \(String(describing: failure))")
        #expect(writer.writes > before, "the writer kept going after the snapshot")
        #expect(try await writer.mismatches().isEmpty)
        let nodes = try await py.ok("query-named-block-nodes") as? [[String: Any]] ?? []
        let s1 = nodes.first { $0["node-name"] as? String == "s1" }
        #expect(s1?["backing_file"] as? String == dir.file("d0.qcow2"))
        #expect(s1?["backing_file_depth"] as? Int == 1)
        // The old top cannot go while the overlay uses it.
        let del = try await py.execute("blockdev-del", ["node-name": "d0"])
        #expect((del["error"] as? [String: Any])?["desc"] as? String == "Node 'd0' is busy: node is used as backing hd of 's1'")
        try? await writer.node.close()
        try await py.ok("quit")
        #expect(d.stop() == 0)
        try writer.writeModel(to: dir.file("model.raw"))
        // s2 was created without a backing file name: point it at s1 (as a management tool
        // does with change-backing-file) before reading the chain offline.
        try mustRun("qemu-img", "rebase", "-u", "-f", "qcow2", "-b", dir.file("s1.qcow2"), "-F", "qcow2", dir.file("s2.qcow2"))
        for img in ["d0.qcow2", "s1.qcow2", "s2.qcow2"] {
            let c = try run("qemu-img", ["check", dir.file(img)])
            #expect(c.status == 0, "\(img): \(c)")
        }
        let cmp = try run("qemu-img", ["compare", "-f", "qcow2", "-F", "raw", dir.file("s2.qcow2"), dir.file("model.raw")])
        #expect(cmp.status == 0, "\(cmp)")
        // Later writes landed in each overlay: both have data of their own.
        for img in ["s1.qcow2", "s2.qcow2"] {
            let map = try run("qemu-img", ["map", "--output=json", "-U", dir.file(img)])
            #expect(map.stdout.contains("\"depth\": 0, \"present\": true, \"zero\": false, \"data\": true"), "\(img): \(map.stdout)")
        }
        print("live snapshot: \(writer.writes) writes, longest \(String(format: "%.2f", writer.maxLatency * 1000)) ms")
    }

    @Test func transactionOverTwoDisksIsAtomic() async throws {
        let dir = TempDir("qmp-txn")
        for n in ["a", "b"] { try mustRun("qemu-img", "create", "-q", "-f", "qcow2", dir.file("\(n).qcow2"), "4M") }
        let d = try QMPHarness.startDaemon(dir: dir)
        defer { d.stop() }
        let py = try PyQMP(socket: d.socket)
        try await py.ok("nbd-server-start", ["addr": ["type": "unix", "data": ["path": dir.file("nbd.sock")]]])
        try await addDisk(py, dir, "a")
        try await addDisk(py, dir, "b")
        let wa = try await ModelWriter(uri: "nbd+unix:///a?socket=\(dir.file("nbd.sock"))", blocks: 1024)
        let wb = try await ModelWriter(uri: "nbd+unix:///b?socket=\(dir.file("nbd.sock"))", blocks: 1024)
        wa.start(seed: 2)
        wb.start(seed: 3)
        try await Task.sleep(nanoseconds: 200_000_000)
        let nodesBefore = try await py.ok("query-named-block-nodes", ["flat": true]) as? [[String: Any]] ?? []

        // The second action fails (its directory does not exist): nothing may change.
        let bad = try await py.execute("transaction", ["actions": [
            ["type": "blockdev-snapshot-sync", "data": ["node-name": "a", "snapshot-file": dir.file("x-a.qcow2"), "snapshot-node-name": "xa"]],
            ["type": "block-dirty-bitmap-add", "data": ["node": "b", "name": "tb"]],
            ["type": "blockdev-snapshot-sync", "data": ["node-name": "b", "snapshot-file": dir.file("missing/x-b.qcow2"), "snapshot-node-name": "xb"]],
        ]])
        #expect(bad["error"] != nil, "\(bad)")
        #expect(!FileManager.default.fileExists(atPath: dir.file("x-a.qcow2")), "a created overlay is removed")
        let nodesAfter = try await py.ok("query-named-block-nodes", ["flat": true]) as? [[String: Any]] ?? []
        #expect(nodesAfter.map { $0["node-name"] as? String } == nodesBefore.map { $0["node-name"] as? String })
        #expect(nodesAfter.allSatisfy { $0["dirty-bitmaps"] == nil }, "the bitmap added by the transaction is gone")
        #expect(try await exportNodes(py) == ["e-a": "a", "e-b": "b"])

        // Both snapshots at once.
        try await py.ok("transaction", ["actions": [
            ["type": "blockdev-snapshot-sync", "data": ["node-name": "a", "snapshot-file": dir.file("a1.qcow2"), "snapshot-node-name": "a1"]],
            ["type": "blockdev-snapshot-sync", "data": ["node-name": "b", "snapshot-file": dir.file("b1.qcow2"), "snapshot-node-name": "b1"]],
        ]])
        #expect(try await exportNodes(py) == ["e-a": "a1", "e-b": "b1"])
        try await Task.sleep(nanoseconds: 200_000_000)
        for w in [wa, wb] {
            let failure = await w.stop()
            #expect(failure == nil, "writer failed: \(String(describing: failure))")
            #expect(try await w.mismatches().isEmpty)
            try? await w.node.close()
        }
        try await py.ok("quit")
        #expect(d.stop() == 0)
        for (w, top) in [(wa, "a1"), (wb, "b1")] {
            try w.writeModel(to: dir.file("\(top).raw"))
            let cmp = try run("qemu-img", ["compare", "-f", "qcow2", "-F", "raw", dir.file("\(top).qcow2"), dir.file("\(top).raw")])
            #expect(cmp.status == 0, "\(cmp)")
        }
        for img in ["a.qcow2", "b.qcow2", "a1.qcow2", "b1.qcow2"] {
            let c = try run("qemu-img", ["check", dir.file(img)])
            #expect(c.status == 0, "\(img): \(c)")
        }
    }

    /// A command that hangs (an NBD server that never answers) holds neither the other
    /// clients' queries nor `quit`.
    @Test func slowCommandDoesNotBlockOtherClients() async throws {
        let dir = TempDir("qmp-slow")
        let mute = dir.file("mute.sock")
        let listener = Process()
        listener.executableURL = URL(fileURLWithPath: Tools.which("python3") ?? "/usr/bin/python3")
        listener.arguments = ["-c", "import socket,sys,time; s=socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(8); time.sleep(60)", mute]
        try listener.run()
        defer { listener.terminate() }
        while !FileManager.default.fileExists(atPath: mute) { usleep(10_000) }
        let d = try QMPHarness.startDaemon(dir: dir)
        defer { d.stop() }
        let a = try PyQMP(socket: d.socket), b = try PyQMP(socket: d.socket)
        let hung = Task { _ = try? await a.execute("blockdev-add", ["driver": "nbd", "node-name": "n", "server": ["type": "unix", "path": mute]]) }
        // A second client queues more commands than the per-client limit behind a hung one.
        let c = try QMPHarness.rawClient(d.socket)
        defer { close(c) }
        let burst = "{\"execute\": \"qmp_capabilities\"}\n{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": \"nbd\", \"node-name\": \"m\", \"server\": {\"type\": \"unix\", \"path\": \"\(mute)\"}}}\n"
            + String(repeating: "{\"execute\": \"blockdev-del\", \"arguments\": {\"node-name\": \"x\"}}\n", count: 20)
        _ = burst.withCString { send(c, $0, strlen($0), Int32(MSG_NOSIGNAL)) }
        try await Task.sleep(nanoseconds: 300_000_000)
        let t0 = Date()
        let v = try await b.execute("query-version")
        #expect(v["return"] != nil)
        #expect(try await b.execute("query-block-exports")["return"] != nil)
        #expect(Date().timeIntervalSince(t0) < 2)
        try await b.ok("quit")
        #expect(d.stop() == 0)
        _ = await hung.value
    }

    /// `nbd --qmp` with an image: qemu-nbd's export plus the monitor; SIGTERM ends it cleanly.
    /// QEMU's export removal modes: safe refuses an export with a client ("still in use"),
    /// hard disconnects it and `BLOCK_EXPORT_DELETED` follows; the same through the older
    /// `nbd-server-add`/`nbd-server-remove`, whose export id is its name.
    @Test func exportRemovalModes() async throws {
        let dir = TempDir("qmp-exports")
        try mustRun("qemu-img", "create", "-q", "-f", "raw", dir.file("d.raw"), "4M")
        try mustRun("qemu-io", "-f", "raw", "-c", "write -P 0x3c 0 1M", dir.file("d.raw"))
        let d = try QMPHarness.startDaemon(dir: dir)
        defer { d.stop() }
        let py = try PyQMP(socket: d.socket)
        let sock = dir.file("nbd.sock")
        try await py.ok("nbd-server-start", ["addr": ["type": "unix", "data": ["path": sock]]])
        try await py.ok("blockdev-add", ["driver": "raw", "node-name": "d0",
                                         "file": ["driver": "file", "filename": dir.file("d.raw")]])
        try await py.ok("block-export-add", ["type": "nbd", "id": "e0", "node-name": "d0", "name": "disk"])
        let client = try await NBDClientNode.connect(try NBDURI("nbd+unix:///disk?socket=\(sock)"), readOnly: true)
        #expect(try await read(client, at: 0, count: 4096).allSatisfy { $0 == 0x3c })
        let safe = try await py.execute("block-export-del", ["id": "e0"])
        #expect((safe["error"] as? [String: Any])?["desc"] as? String == "export 'e0' still in use", "\(safe)")
        #expect((try await py.ok("query-block-exports") as? [Any])?.count == 1)
        try await py.ok("block-export-del", ["id": "e0", "mode": "hard"])
        let ev = try await py.waitEvent("BLOCK_EXPORT_DELETED")
        #expect((ev["data"] as? [String: Any])?["id"] as? String == "e0", "\(ev)")
        await #expect(throws: (any Error).self) { _ = try await read(client, at: 0, count: 4096) }
        try? await client.close()
        #expect((try await py.ok("query-block-exports") as? [Any])?.isEmpty == true)
        // The older pair: a writable request on a read-only node is quietly downgraded.
        try await py.ok("nbd-server-add", ["device": "d0", "writable": true])
        let c2 = try await NBDClientNode.connect(try NBDURI("nbd+unix:///d0?socket=\(sock)"), readOnly: false)
        let busy = try await py.execute("nbd-server-remove", ["name": "d0"])
        #expect((busy["error"] as? [String: Any])?["desc"] as? String == "export 'd0' still in use", "\(busy)")
        try await write(c2, at: 0, [UInt8](repeating: 0x4d, count: 4096))
        try await c2.close()
        // The server notices the disconnect on its own thread; retry until it has.
        var removed = false
        for _ in 0..<50 where !removed {
            removed = try await py.execute("nbd-server-remove", ["name": "d0"])["return"] != nil
            if !removed { try await Task.sleep(nanoseconds: 20_000_000) }
        }
        #expect(removed)
        let missing = try await py.execute("nbd-server-remove", ["name": "d0"])
        #expect((missing["error"] as? [String: Any])?["desc"] as? String == "Export 'd0' is not found", "\(missing)")
        try await py.ok("blockdev-del", ["node-name": "d0"])
        try mustRun("qemu-io", "-f", "raw", "-c", "read -P 0x4d 0 4k", "-c", "read -P 0x3c 4k 1020k", dir.file("d.raw"))
    }

    @Test func daemonWithImageOnCommandLine() async throws {
        let dir = TempDir("qmp-image")
        try mustRun("qemu-img", "create", "-q", "-f", "qcow2", dir.file("disk.qcow2"), "4M")
        let d = try QMPHarness.startDaemon(dir: dir, args: ["-k", dir.file("nbd.sock"), "-x", "disk", "-f", "qcow2", dir.file("disk.qcow2")])
        let py = try PyQMP(socket: d.socket)
        let exports = try await py.ok("query-block-exports") as? [[String: Any]] ?? []
        #expect(exports.first?["id"] as? String == "export0")
        #expect(exports.first?["node-name"] as? String == "disk0")
        try mustRun("qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 64k", "nbd+unix:///disk?socket=\(dir.file("nbd.sock"))")
        try await py.ok("blockdev-snapshot-sync", ["node-name": "disk0", "snapshot-file": dir.file("s.qcow2")])
        try mustRun("qemu-io", "-f", "raw", "-c", "write -P 0x6b 64k 64k", "nbd+unix:///disk?socket=\(dir.file("nbd.sock"))")
        #expect(d.stop() == 0, "SIGTERM: a clean exit")
        #expect(!FileManager.default.fileExists(atPath: d.socket), "the monitor socket is removed")
        try mustRun("qemu-io", "-c", "read -P 0x5a 0 64k", "-c", "read -P 0x6b 64k 64k", dir.file("s.qcow2"))
        try mustRun("qemu-io", "-c", "read -P 0 64k 64k", dir.file("disk.qcow2"))
        for img in ["disk.qcow2", "s.qcow2"] { try mustRun("qemu-img", "check", "-q", dir.file(img)) }
    }
}
