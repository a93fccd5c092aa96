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

/// The QMP commands beyond the first block set (`query-block`, `query-blockstats`,
/// `block_resize`, `block-set-write-threshold`, `change-backing-file`, the backup
/// commands, …): golden transcripts replayed on `nbd --qmp` and qemu-storage-daemon 7.2,
/// and in-process checks of what a transcript cannot show (devices, which only `vm` has;
/// request counts; the refused backups).
@Suite(.serialized)
struct QMPSurfaceTests {
    static let haveQSD = QMPHarness.ready && Tools.which("qemu-storage-daemon") != nil

    /// Replays `script` on a fresh daemon over the usual fixture and returns its lines.
    private static func transcript(daemon: [String], script: String) throws -> [Substring] {
        try QMPHarness.transcript(daemon: daemon, script: script, dir: TempDir("qmp-surface")).split(separator: "\n")
    }

    /// Both transcripts of `script`, compared line by line.
    static func compareWithQemu(_ script: String) throws {
        guard haveQSD else {
            print("QMPSurfaceTests: needs qemu-storage-daemon, python3 with qemu.qmp and the built nbd tool; skipped")
            return
        }
        let ours = try transcript(daemon: [Tools.executable("nbd") ?? "nbd", "--qmp", "$SOCK"], script: script)
        let qemu = try transcript(daemon: [Tools.which("qemu-storage-daemon") ?? "qemu-storage-daemon",
                                           "--chardev", "socket,path=$SOCK,server=on,wait=off,id=m0", "--monitor", "chardev=m0"],
                                  script: script)
        #expect(ours.count == qemu.count)
        // Not vacuous: where the script waits for events, QEMU's transcript has some.
        if qemu.contains(where: { $0.hasPrefix("timeout") }) || ours.contains(where: { $0.hasPrefix("{\"event\"") }) {
            #expect(qemu.contains { $0.hasPrefix("{\"event\"") })
        }
        for (i, (x, y)) in zip(ours, qemu).enumerated() {
            #expect(x == y, "reply \(i + 1) differs:\nours: \(x)\nqemu: \(y)")
        }
    }

    /// query-block, query-blockstats, block_resize, block-set-write-threshold with its event
    /// (through NBD writes), change-backing-file, the backup commands' argument errors.
    @Test func blockQueriesMatchQemuStorageDaemon() throws {
        try Self.compareWithQemu("transcript-surface.jsonl")
    }

    /// blockdev-snapshot-internal-sync / -delete-internal-sync (SnapshotInfo, times masked)
    /// and x-debug-block-dirty-bitmap-sha256 after NBD writes: the same hashes as QEMU's.
    @Test func internalSnapshotsAndBitmapHashesMatchQemuStorageDaemon() throws {
        try Self.compareWithQemu("transcript-internal-snapshot.jsonl")
    }

    @Test func bitmapHashIsSHA256OfLittleEndianWords() throws {
        // Known answers: SHA-256 of "abc", and of 32 zero bytes (an empty 16 MiB bitmap at 64 KiB).
        #expect(SHA256.hex(Array("abc".utf8)) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        #expect(SHA256.hex([UInt8](repeating: 0, count: 32)) == "66687aadf862bd776c8fc18b8e9f8e20089714856ee233b3902a591d0d5f2925")
        let b = try DirtyBitmap(name: "b", size: 16 << 20, granularity: 65536)
        b.mark(offset: 0, length: 1)
        b.mark(offset: 65 * 65536, length: 65536 * 2)
        let words = QMPMonitor.hbitmapWords(b)
        #expect(words.count == 32)
        #expect(words[0] == 1 && words[8] == 0b110 && words.enumerated().allSatisfy { [0, 8].contains($0.offset) || $0.element == 0 })
    }

    // MARK: - In process

    static func parse(_ json: String) throws -> QObject.Dict {
        guard case .dict(let d) = try QObject.parseJSON(json) else { throw QMPTestError(description: "not an object: \(json)") }
        return d
    }

    /// A monitor with qcow2 node `d` (4 MiB) used by device `drive0`, as `vm` sets one up.
    static func monitorWithDevice(_ dir: TempDir) async throws -> (QMPMonitor, BlockBackend) {
        try await ImageCreator.create(format: "qcow2", path: dir.file("d.qcow2"), size: 4 << 20)
        let m = QMPMonitor()
        try await m.execute("blockdev-add", arguments: try Self.parse(#"{"driver": "qcow2", "node-name": "d", "file": {"driver": "file", "filename": "\#(dir.file("d.qcow2"))"}}"#))
        let node = try #require(m.graph.node(named: "d"))
        let backend = BlockBackend(name: "drive0", node: node, qdev: "/machine/peripheral-anon/device[0]/virtio-backend")
        m.graph.attach(backend)
        return (m, backend)
    }

    @Test func queryBlockShowsDevicesAndFollowsSnapshots() async throws {
        let dir = TempDir("qmp-query-block")
        let (m, backend) = try await Self.monitorWithDevice(dir)
        defer { m.graph.detach(backend) }
        guard case .list(let list) = try await m.execute("query-block"), list.count == 1, case .dict(let info) = list[0] else {
            Issue.record("query-block: one device expected"); return
        }
        #expect(info.entries.map(\.key) == ["device", "qdev", "type", "removable", "locked", "io-status", "inserted"])
        #expect(info["device"] == .string("drive0"))
        #expect(info["type"] == .string("unknown"))
        #expect(info["io-status"] == .string("ok"))
        // inserted is the node's BlockDeviceInfo, as query-named-block-nodes has it.
        guard case .list(let nodes) = try await m.execute("query-named-block-nodes") else { Issue.record("nodes"); return }
        #expect(nodes.contains(info["inserted"]!))
        guard case .dict(let inserted) = info["inserted"]! else { return }
        #expect(inserted["node-name"] == .string("d"))

        // After a live snapshot of the device, inserted is the overlay.
        try await m.execute("blockdev-snapshot-sync", arguments: try Self.parse(#"{"device": "drive0", "snapshot-file": "\#(dir.file("s.qcow2"))", "snapshot-node-name": "s", "format": "qcow2"}"#))
        guard case .list(let after) = try await m.execute("query-block"), case .dict(let i2) = after[0],
              case .dict(let ins2)? = i2["inserted"] else { Issue.record("query-block after snapshot"); return }
        #expect(ins2["node-name"] == .string("s"))
        #expect(ins2["backing_file"] == .string(dir.file("d.qcow2")))
        #expect(ins2["backing_file_depth"] == .int(1))
        await m.block.closeAll()
    }

    @Test func blockstatsCountDeviceRequests() async throws {
        let dir = TempDir("qmp-blockstats")
        let (m, backend) = try await Self.monitorWithDevice(dir)
        defer { m.graph.detach(backend) }
        for i in 0..<3 { try await backend.write(at: Int64(i) * 65536, bytes: [UInt8](repeating: 5, count: 4096)) }
        try await backend.writeZeroes(at: 1 << 20, length: 8192, flags: [])
        _ = try await backend.read(at: 0, count: 512)
        _ = try await backend.read(at: 4096, count: 1024)
        try await backend.flush()
        await #expect(throws: (any Error).self) { _ = try await backend.read(at: 8 << 20, count: 512) }
        guard case .list(let l) = try await m.execute("query-blockstats"), l.count == 1, case .dict(let s) = l[0],
              case .dict(let st)? = s["stats"] else { Issue.record("query-blockstats"); return }
        #expect(s["device"] == .string("drive0"))
        #expect(s["node-name"] == .string("d"))
        #expect(st["wr_bytes"] == .int(3 * 4096 + 8192))
        #expect(st["wr_operations"] == .int(4))
        #expect(st["rd_bytes"] == .int(1536))
        #expect(st["rd_operations"] == .int(2))
        #expect(st["failed_rd_operations"] == .int(1))
        #expect(st["flush_operations"] == .int(1))
        #expect(st["wr_highest_offset"] == .int((1 << 20) + 8192))
        #expect(st["account_invalid"] == .bool(true))
        if case .int(let idle)? = st["idle_time_ns"] { #expect(idle >= 0) } else { Issue.record("idle_time_ns missing") }
        if case .int(let t)? = st["wr_total_time_ns"] { #expect(t > 0) } else { Issue.record("wr_total_time_ns missing") }
        // The file node below: its own highest offset; the node level has no request counts.
        guard case .dict(let parent)? = s["parent"], case .dict(let ps)? = parent["stats"] else { Issue.record("parent"); return }
        #expect(ps["wr_bytes"] == .int(0))
        if case .int(let h)? = ps["wr_highest_offset"] { #expect(h > 0) } else { Issue.record("parent wr_highest_offset") }
        await m.block.closeAll()
    }

    @Test func writeThresholdFiresOnceAndResets() async throws {
        let dir = TempDir("qmp-threshold")
        let (m, backend) = try await Self.monitorWithDevice(dir)
        defer { m.graph.detach(backend) }
        let events = m.subscribe()
        try await m.execute("block-set-write-threshold", arguments: try Self.parse(#"{"node-name": "d", "write-threshold": 1048576}"#))
        try await backend.write(at: 0, bytes: [UInt8](repeating: 1, count: 4096))          // below: nothing
        try await backend.write(at: 1048576 - 512, bytes: [UInt8](repeating: 1, count: 4096))   // crosses by 3584
        try await backend.write(at: 2 << 20, bytes: [UInt8](repeating: 1, count: 4096))     // reset: nothing
        try await m.execute("query-version")
        m.emit(event: "MARK")
        var seen: [QObject.Dict] = []
        for await e in events {
            guard case .dict(let d) = e else { continue }
            if d["event"] == .string("MARK") { break }
            seen.append(d)
        }
        #expect(seen.count == 1)
        #expect(seen.first?["event"] == .string("BLOCK_WRITE_THRESHOLD"))
        #expect(seen.first?["data"] == .dict(QObject.Dict([("node-name", .string("d")), ("amount-exceeded", .int(3584)),
                                                          ("write-threshold", .int(1048576))])))
        guard case .list(let nodes) = try await m.execute("query-named-block-nodes"), case .dict(let n)? = nodes.first(where: {
            if case .dict(let x) = $0 { return x["node-name"] == .string("d") } else { return false }
        }) else { Issue.record("node d"); return }
        #expect(n["write_threshold"] == .int(0))
        await m.block.closeAll()
    }

    @Test func resizeAndChangeBackingFileOnDevice() async throws {
        let dir = TempDir("qmp-resize")
        let (m, backend) = try await Self.monitorWithDevice(dir)
        defer { m.graph.detach(backend) }
        // A device shares resizing (an export does not): block_resize by device name works.
        try await m.execute("block_resize", arguments: try Self.parse(#"{"device": "drive0", "size": 8388608}"#))
        #expect(backend.length == 8 << 20)
        try await backend.write(at: (8 << 20) - 4096, bytes: [UInt8](repeating: 3, count: 4096))
        try await m.execute("block_resize", arguments: try Self.parse(#"{"node-name": "d", "size": 2097152}"#))
        #expect(backend.length == 2 << 20)
        // change-backing-file rewrites the overlay's header (read back by qemu-img).
        try await m.execute("blockdev-snapshot-sync", arguments: try Self.parse(#"{"device": "drive0", "snapshot-file": "\#(dir.file("s.qcow2"))", "snapshot-node-name": "s", "format": "qcow2"}"#))
        try await m.execute("change-backing-file", arguments: try Self.parse(#"{"device": "drive0", "image-node-name": "s", "backing-file": "d.qcow2"}"#))
        await #expect(throws: QMPError.generic("not allowing backing file change on an image without a backing file")) {
            try await m.execute("change-backing-file", arguments: try Self.parse(#"{"device": "drive0", "image-node-name": "d", "backing-file": "x"}"#))
        }
        try await m.execute("block_resize", arguments: try Self.parse(#"{"device": "drive0", "size": 4194304}"#))
        await m.block.closeAll()
        let info = try mustRun("qemu-img", "info", "--output=json", dir.file("s.qcow2")).stdout
        #expect(info.contains(#""backing-filename": "d.qcow2""#))
        #expect(info.contains(#""virtual-size": 4194304"#))
        #expect(try mustRun("qemu-img", "check", dir.file("s.qcow2")).stdout.contains("No errors"))
    }

    @Test func backupCommandsRefuseHonestly() async throws {
        let dir = TempDir("qmp-backup")
        let (m, backend) = try await Self.monitorWithDevice(dir)
        defer { m.graph.detach(backend) }
        try await ImageCreator.create(format: "qcow2", path: dir.file("t.qcow2"), size: 4 << 20)
        try await m.execute("blockdev-add", arguments: try Self.parse(#"{"driver": "qcow2", "node-name": "t", "file": {"driver": "file", "filename": "\#(dir.file("t.qcow2"))"}}"#))
        for (cmd, args) in [("blockdev-backup", #"{"job-id": "b0", "device": "drive0", "target": "t", "sync": "full"}"#),
                            ("drive-backup", #"{"job-id": "b0", "device": "d", "target": "\#(dir.file("b.qcow2"))", "sync": "full"}"#)] {
            do {
                try await m.execute(cmd, arguments: try Self.parse(args))
                Issue.record("\(cmd) was accepted")
            } catch let e as QMPError {
                #expect(e.errorClass == .genericError)
                #expect(e.desc.hasPrefix("\(cmd): backup jobs are not supported yet"))
            }
        }
        // Nothing was started, nothing created.
        #expect(m.jobs.all.isEmpty)
        #expect(!FileManager.default.fileExists(atPath: dir.file("b.qcow2")))
        await m.block.closeAll()
    }
}
