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


@Suite(.serialized, .enabled(if: BitmapFixtures.ready, Comment(rawValue: NBDHarness.missing)))
struct Qcow2BitmapTests {
    /// Bitmaps made by qemu-img (several granularities, a disabled one) and marked by
    /// qemu-io read as QEMU reads them (its qemu-nbd -B map).
    @Test(arguments: [512, 4096, 65536, 1 << 20])
    func readsQemuBitmaps(granularity: Int) async throws {
        let dir = TempDir("bm")
        let path = try BitmapFixtures.qemuImage(dir, granularity: granularity)
        let node = try await ImageOpener.open(path, options: OpenOptions(format: "qcow2", readOnly: true))
        let q = try #require(node as? Qcow2Node)
        #expect(q.persistentBitmaps.all.map(\.name) == ["b0", "b1", "off"])
        #expect(q.persistentBitmaps.named("b0")?.granularity == Int64(granularity))
        #expect(q.persistentBitmaps.named("off")?.isEnabled == false)
        #expect(q.persistentBitmaps.all.allSatisfy { $0.isPersistent && !$0.isInconsistent })
        var ours: [String] = []
        for b in q.persistentBitmaps.all { ours.append(BitmapFixtures.map(of: b, size: q.length)) }
        try await node.close()
        for (i, name) in ["b0", "b1", "off"].enumerated() {
            #expect(ours[i] == (try BitmapFixtures.map("qemu-nbd", path, name, dir: dir)), "bitmap \(name)")
        }
        // A read-only open changes nothing.
        #expect(try BitmapFixtures.checkClean(path))
    }

    /// The same writes through our io tool and through qemu-io leave the same bitmaps (as
    /// QEMU reads them back), the same info, and a clean image.
    @Test func ioMarksBitmapsLikeQemuIo() throws {
        let dir = TempDir("bm")
        let base = try BitmapFixtures.qemuImage(dir)
        let ours = dir.file("ours.qcow2"), theirs = dir.file("theirs.qcow2")
        try FileManager.default.copyItem(atPath: base, toPath: ours)
        try FileManager.default.copyItem(atPath: base, toPath: theirs)
        let cmds = ["write 2M 70k", "write -z 7M 1M", "write -z 3M 1000", "discard 3M 64k", "write 16711680 65536",
                    "write 10M 1"]
        try BitmapFixtures.must("qemu-io", ["-f", "qcow2"] + cmds.flatMap { ["-c", $0] } + [theirs])
        try BitmapFixtures.must("io", ["-f", "qcow2"] + cmds.flatMap { ["-c", $0] } + [ours])
        #expect(try BitmapFixtures.info(ours) == (try BitmapFixtures.info(theirs)))
        #expect(try BitmapFixtures.checkClean(ours))
        for name in ["b0", "b1", "off"] {
            #expect(try BitmapFixtures.map("qemu-nbd", ours, name, dir: dir) == (try BitmapFixtures.map("qemu-nbd", theirs, name, dir: dir)),
                    "bitmap \(name)")
        }
    }

    /// Bitmaps added and marked through the library are what qemu-img info and qemu-nbd -B
    /// see after close; the image checks clean.
    @Test func bitmapsWeAddAreReadByQemu() async throws {
        let dir = TempDir("bm")
        let path = dir.file("x.qcow2")
        try await ImageCreator.create(format: "qcow2", path: path, size: 32 << 20)
        let node = try await ImageOpener.open(path, options: OpenOptions(format: "qcow2"))
        let q = try #require(node as? Qcow2Node)
        let a = try q.addPersistentBitmap(name: "a", granularity: 4096)
        try q.addPersistentBitmap(name: "d", disabled: true)
        try await write(node, at: 3 << 20, [UInt8](repeating: 7, count: 5000))
        try await node.writeZeroes(at: 20 << 20, length: 3 << 20, flags: [])
        try await node.discard(at: 30 << 20, length: 1 << 20)
        let expected = BitmapFixtures.map(of: a, size: q.length)
        try await node.close()
        let json = try mustRun("qemu-img", "info", "--output=json", path).stdout
        #expect(json.contains("\"name\": \"a\"") && json.contains("\"granularity\": 4096"))
        #expect(json.contains("\"flags\": [\n                    ],\n                    \"name\": \"d\""))
        #expect(try BitmapFixtures.checkClean(path))
        #expect(try BitmapFixtures.map("qemu-nbd", path, "a", dir: dir) == expected)
        #expect(try BitmapFixtures.map("qemu-nbd", path, "d", dir: dir).contains("    0  clean\n"))
        // Ours reads it back the same way, and writes made by qemu-io after that too.
        try mustRun("qemu-io", "-f", "qcow2", "-c", "write 8M 64k", path)
        #expect(try BitmapFixtures.map("nbd", path, "a", dir: dir) == (try BitmapFixtures.map("qemu-nbd", path, "a", dir: dir)))
    }

    /// A server killed with SIGKILL while the image is open read-write leaves the bitmaps
    /// in use: qemu-img info shows "in-use", our info and check agree with qemu-img's, and
    /// such a bitmap can only be removed.
    @Test func killedWriterLeavesBitmapsInUse() async throws {
        let dir = TempDir("bm")
        let path = try BitmapFixtures.qemuImage(dir)
        let s = try NBDHarness.start("nbd", ["-t", "-f", "qcow2"], image: path, dir: dir, tag: "rw")
        try mustRun("qemu-io", "-f", "raw", "-c", "write 0 64k", s.uri)
        kill(s.pid, SIGKILL)
        NBDHarness.waitGone(s.pid)
        let info = try mustRun("qemu-img", "info", path).stdout
        #expect(info.contains("[0]: in-use\n                [1]: auto\n            name: b0"))
        #expect(try run("img", "info", path).stdout == info)
        let json = try mustRun("qemu-img", "info", "--output=json", path).stdout
        #expect(try run("img", "info", "--output=json", path).stdout == json)
        let check = try run("qemu-img", "check", path)
        let ourCheck = try run("img", "check", path)
        #expect(ourCheck.stdout == check.stdout && ourCheck.status == check.status)

        let node = try await ImageOpener.open(path, options: OpenOptions(format: "qcow2"))
        let q = try #require(node as? Qcow2Node)
        let b0 = try #require(q.persistentBitmaps.named("b0"))
        #expect(b0.isInconsistent)
        #expect(b0.useError()?.message.hasPrefix("Bitmap 'b0' is inconsistent and cannot be used") == true)
        await #expect(throws: BlockError.self) { try await q.truncate(to: 32 << 20, preallocation: .off) }
        try await q.removePersistentBitmap(named: "b0")
        try await node.close()
        #expect(try BitmapFixtures.checkClean(path))
        #expect(try !mustRun("qemu-img", "info", path).stdout.contains("name: b0"))
    }

    /// An explicit store writes the bits and marks the bitmaps in use again (the node stays
    /// open read-write); storing twice and closing afterwards work, and QEMU reads the result.
    @Test func explicitStoreKeepsBitmapsInUse() async throws {
        let dir = TempDir("bm")
        let path = try BitmapFixtures.qemuImage(dir)
        let node = try await ImageOpener.open(path, options: OpenOptions(format: "qcow2"))
        let q = try #require(node as? Qcow2Node)
        #expect(q.persistentBitmapInfo.allSatisfy { $0.flags.contains(.inUse) })
        try await write(node, at: 0, [1, 2, 3])
        try await q.storePersistentBitmaps()
        #expect(q.persistentBitmapInfo.allSatisfy { $0.flags.contains(.inUse) })
        try await q.storePersistentBitmaps()
        let b1 = BitmapFixtures.map(of: try #require(q.persistentBitmaps.named("b1")), size: q.length)
        try await node.close()
        #expect(try BitmapFixtures.checkClean(path))
        #expect(try !mustRun("qemu-img", "info", path).stdout.contains("in-use"))
        #expect(try BitmapFixtures.map("qemu-nbd", path, "b1", dir: dir) == b1)
    }

    /// Resize (grow, shrink) and amend to compat=0.10 on an image with bitmaps give what
    /// qemu-img gives.
    @Test(arguments: [["resize", "X", "24M"], ["resize", "--shrink", "X", "8M"], ["amend", "-o", "compat=0.10", "X"]])
    func resizeAndAmendLikeQemu(_ args: [String]) throws {
        let dir = TempDir("bm")
        let base = try BitmapFixtures.qemuImage(dir)
        let ours = dir.file("ours.qcow2"), theirs = dir.file("theirs.qcow2")
        try FileManager.default.copyItem(atPath: base, toPath: ours)
        try FileManager.default.copyItem(atPath: base, toPath: theirs)
        let q = try run("qemu-img", args.map { $0 == "X" ? theirs : $0 })
        let o = try run("img", args.map { $0 == "X" ? ours : $0 })
        #expect(o.status == q.status && o.stdout == q.stdout)
        let qc = try run("qemu-img", "check", theirs), oc = try run("qemu-img", "check", ours)
        #expect(oc.status == qc.status)
        if args[0] == "resize" {
            #expect(try BitmapFixtures.info(ours) == (try BitmapFixtures.info(theirs)))
            #expect(try BitmapFixtures.map("qemu-nbd", ours, "b1", dir: dir) == (try BitmapFixtures.map("qemu-nbd", theirs, "b1", dir: dir)))
        }
    }

    /// Check and repair count the bitmap directory, tables and data: `-r all` frees nothing
    /// live, and leaks left by a downgrade are repaired; outputs equal qemu-img's.
    @Test func checkAndRepairCountBitmaps() throws {
        let dir = TempDir("bm")
        let base = try BitmapFixtures.qemuImage(dir)
        let ours = dir.file("ours.qcow2"), theirs = dir.file("theirs.qcow2")
        try FileManager.default.copyItem(atPath: base, toPath: ours)
        try FileManager.default.copyItem(atPath: base, toPath: theirs)
        let q = try run("qemu-img", "check", "-r", "all", theirs), o = try run("img", "check", "-r", "all", ours)
        #expect(o.stdout == q.stdout && o.status == q.status)
        #expect(try BitmapFixtures.checkClean(ours))
        #expect(try BitmapFixtures.map("qemu-nbd", ours, "b1", dir: dir) == (try BitmapFixtures.map("qemu-nbd", base, "b1", dir: dir)))
        for p in [ours, theirs] { try mustRun("qemu-img", "amend", "-o", "compat=0.10", p) }
        // Both leak as many clusters: the bitmaps' (QEMU leaks the copies it stores at
        // close under the v2 header, we the ones the directory had; positions differ).
        let ql = try run("qemu-img", "check", theirs), ol = try run("img", "check", ours)
        func leaks(_ s: String) -> [Substring] { s.split(separator: "\n").filter { $0.contains("leaked clusters were found") } }
        #expect(ol.status == 3 && ql.status == 3)
        #expect(!leaks(ol.stdout).isEmpty && leaks(ol.stdout) == leaks(ql.stdout))
        let qr = try run("qemu-img", "check", "-r", "leaks", theirs), or = try run("img", "check", "-r", "leaks", ours)
        #expect(or.status == qr.status && or.stdout.hasPrefix("Leaked cluster") == qr.stdout.hasPrefix("Leaked cluster"))
        #expect(try BitmapFixtures.checkClean(ours))
    }

    /// Reverting to an internal snapshot is refused while the image has bitmaps, as QEMU's
    /// bdrv_snapshot_goto does; creating and deleting snapshots work.
    @Test func snapshotApplyRefusedWithBitmaps() throws {
        let dir = TempDir("bm")
        let base = try BitmapFixtures.qemuImage(dir)
        let ours = dir.file("ours.qcow2"), theirs = dir.file("theirs.qcow2")
        try FileManager.default.copyItem(atPath: base, toPath: ours)
        try FileManager.default.copyItem(atPath: base, toPath: theirs)
        for args in [["-c", "s1"], ["-a", "s1"], ["-a", "nope"], ["-d", "s1"]] {
            let q = try run("qemu-img", ["snapshot"] + args + [theirs]), o = try run("img", ["snapshot"] + args + [ours])
            #expect(o.status == q.status && o.stderr == asImg(q.stderr), "\(args)")
        }
        #expect(try BitmapFixtures.info(ours) == (try BitmapFixtures.info(theirs)))
        #expect(try BitmapFixtures.checkClean(ours))
    }

    /// A bitmaps extension whose autoclear bit was cleared (a program without bitmap
    /// support wrote the image) is ignored with QEMU's warning; check reports the leaks as
    /// qemu-img does; a read-write open drops it exactly as qemu-io's does.
    @Test func staleExtensionIsDropped() throws {
        let dir = TempDir("bm")
        let path = try BitmapFixtures.qemuImage(dir)
        try writeFile(path, at: 88, [UInt8](repeating: 0, count: 8))
        for cmd in [["info"], ["check"], ["map"]] {
            let q = try run("qemu-img", cmd + [path]), o = try run("img", cmd + [path])
            #expect(o.status == q.status && o.stdout == q.stdout && o.stderr == asImg(q.stderr), "\(cmd)")
        }
        let ours = dir.file("ours.qcow2")
        try FileManager.default.copyItem(atPath: path, toPath: ours)
        try mustRun("qemu-io", "-f", "qcow2", "-c", "write 0 1k", path)
        try mustRun("io", "-f", "qcow2", "-c", "write 0 1k", ours)
        #expect(try Data(contentsOf: URL(fileURLWithPath: ours)) == Data(contentsOf: URL(fileURLWithPath: path)))
    }

    /// Damaged bitmap structures are refused at open with QEMU's message, without a crash
    /// and without a byte of the file changing.
    @Test(arguments: [("type", 16, [UInt8(2)]), ("granularity", 17, [40]), ("flags", 12, [0, 0, 0, 0x10]),
                      ("table size", 8, [0, 0, 0, 7]), ("name size", 18, [0x04, 0x00]),
                      ("duplicate name", 32 + 24, Array("b0".utf8)), ("count", -1, [])])
    func corruptDirectoryIsRefused(_ what: String, _ fieldOffset: Int, _ bytes: [UInt8]) async throws {
        let dir = TempDir("bm")
        let path = try BitmapFixtures.qemuImage(dir)
        let node = try await ImageOpener.open(path, options: OpenOptions(format: "qcow2", readOnly: true))
        let ext = try #require(try (node as? Qcow2Node)?.validBitmapsExtension())
        try await node.close()
        if fieldOffset < 0 {
            // The extension's bitmap count, one more than the directory holds.
            let raw = try [UInt8](Data(contentsOf: URL(fileURLWithPath: path)))
            let at = try #require((0..<(raw.count - 4)).first { raw.be32($0) == 0x2385_2875 }) + 8
            try writeFile(path, at: Int64(at), [0, 0, 0, UInt8(ext.count + 1)])
        } else {
            try writeFile(path, at: Int64(ext.directoryOffset) + Int64(fieldOffset), bytes)
        }
        let before = try Data(contentsOf: URL(fileURLWithPath: path))
        await #expect(throws: BlockError.self, "\(what)") {
            _ = try await ImageOpener.open(path, options: OpenOptions(format: "qcow2", readOnly: true))
        }
        let q = try run("qemu-img", "info", path), o = try run("img", "info", path)
        #expect(o.status == q.status && o.stderr == asImg(q.stderr), "\(what)")
        #expect(try Data(contentsOf: URL(fileURLWithPath: path)) == before)
    }

    /// Bad requests to the API fail with QEMU's messages.
    @Test func addRefusesBadRequests() async throws {
        let dir = TempDir("bm")
        let path = dir.file("x.qcow2")
        try await ImageCreator.create(format: "qcow2", path: path, size: 1 << 20)
        let node = try await ImageOpener.open(path, options: OpenOptions(format: "qcow2"))
        let q = try #require(node as? Qcow2Node)
        try q.addPersistentBitmap(name: "a")
        func message(_ body: () throws -> Void) -> String? {
            do { try body(); return nil } catch { return error.asBlockError.message }
        }
        #expect(message { try q.addPersistentBitmap(name: "a") } == "Bitmap already exists: a")
        #expect(message { try q.addPersistentBitmap(name: "") } == "Bitmap name cannot be empty")
        #expect(message { try q.addPersistentBitmap(name: "g", granularity: 1000) } == "Granularity must be power of 2 and at least 512")
        #expect(message { try q.addPersistentBitmap(name: String(repeating: "n", count: 1024), nodeName: "n0") }
                == "Can't make bitmap '\(String(repeating: "n", count: 1024))' persistent in 'n0': Name length exceeds maximum (1023 characters)")
        await #expect(throws: BlockError.self) { try await q.removePersistentBitmap(named: "nope") }
        try await node.close()
        #expect(try BitmapFixtures.checkClean(path))
    }
}
