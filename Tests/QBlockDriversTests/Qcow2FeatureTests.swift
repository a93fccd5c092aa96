import Foundation
import Testing
import QBlock
import TestSupport
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

@Suite(.enabled(if: haveQemuImg, "qemu-img is not installed; `make test` installs qemu-utils"))
struct Qcow2FeatureTests {
    @Test(arguments: [1, 2, 4, 8, 16, 32, 64])
    func refcountWidths(bits: Int) async throws {
        let dir = try tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/r.qcow2"
        var o = Qcow2CreateOptions()
        o.refcountBits = bits
        o.clusterSize = 4096
        try await Qcow2Node.create(path: path, size: 64 << 20, options: o)
        let n = try await ImageOpener.open(path)
        for i in 0..<200 {
            try await n.write(at: Int64(i) * 300_000 % (63 << 20), bytes: [UInt8](repeating: UInt8(i % 250 + 1), count: 5000))
        }
        try await n.discard(at: 0, length: 1 << 20)
        try await n.close()
        let (st, out, err) = try sh(["qemu-img", "check", path])
        #expect(st == 0, "refcount_bits=\(bits): \(out) \(err)")
        let (_, info, _) = try sh(["qemu-img", "info", "--output=json", path])
        #expect(info.contains("\"refcount-bits\": \(bits)"))
    }

    @Test(arguments: [Preallocation.metadata, .falloc, .full])
    func preallocationMatchesQemu(mode: Preallocation) async throws {
        let dir = try tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let ours = dir + "/ours.qcow2", theirs = dir + "/theirs.qcow2"
        var o = Qcow2CreateOptions()
        o.preallocation = mode
        try await Qcow2Node.create(path: ours, size: 16 << 20, options: o)
        try sh(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=\(mode.rawValue)", theirs, "16M"])
        let (st, out, _) = try sh(["qemu-img", "check", ours])
        #expect(st == 0, "\(out)")
        let (_, m1, _) = try sh(["qemu-img", "map", "--output=json", ours])
        let (_, m2, _) = try sh(["qemu-img", "map", "--output=json", theirs])
        #expect(m1 == m2)
        let n = try await ImageOpener.open(ours)
        try await n.write(at: 100, bytes: [1, 2, 3])
        try await n.close()
        let (st2, out2, _) = try sh(["qemu-img", "check", ours])
        #expect(st2 == 0, "\(out2)")
    }

    @Test func repairLeaksAndCorruption() async throws {
        let dir = try tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/x.qcow2"
        try await Qcow2Node.create(path: path, size: 16 << 20, options: Qcow2CreateOptions())
        var n = try await ImageOpener.open(path)
        try await n.write(at: 0, bytes: [UInt8](repeating: 7, count: 200_000))
        try await n.close()
        // Leak: bump the refcount of a cluster past the end; corruption: zero the refcount of a data cluster.
        var bytes = try [UInt8](Data(contentsOf: URL(fileURLWithPath: path)))
        let rb = Int(bytes.be64(65536))
        bytes[rb + 2 * 9] = 0; bytes[rb + 2 * 9 + 1] = 1      // cluster 9: leaked (unused)
        bytes.append(contentsOf: [UInt8](repeating: 0, count: 65536 * 10 - bytes.count % 65536))
        #expect(FileManager.default.createFile(atPath: path, contents: Data(bytes)))
        let (st, _, _) = try sh(["qemu-img", "check", path])
        #expect(st == 3, "a leak gives exit 3")
        n = try await ImageOpener.open(path)
        let q = try #require(n as? Qcow2Node)
        var r = try await q.check(repair: nil)
        #expect(r.leaks == 1 && r.corruptions == 0)
        r = try await q.check(repair: .leaks)
        #expect(r.leaksFixed == 1 && r.leaks == 0)
        try await n.close()
        #expect(try sh(["qemu-img", "check", path]).0 == 0)

        bytes = try [UInt8](Data(contentsOf: URL(fileURLWithPath: path)))
        bytes[rb + 2 * 4] = 0; bytes[rb + 2 * 4 + 1] = 0      // cluster 4 holds data: now a corruption
        #expect(FileManager.default.createFile(atPath: path, contents: Data(bytes)))
        #expect(try sh(["qemu-img", "check", path]).0 == 2)
        n = try await ImageOpener.open(path, options: OpenOptions(forRepair: true))
        let q2 = try #require(n as? Qcow2Node)
        r = try await q2.check(repair: .all)
        #expect(r.corruptions == 0 && r.corruptionsFixed >= 1)
        try await n.close()
        let (st3, out3, _) = try sh(["qemu-img", "check", path])
        #expect(st3 == 0, "\(out3)")
        let (st4, out4, _) = try sh(["qemu-io", "-r", "-c", "read -P 7 0 200000", path])
        #expect(st4 == 0 && !out4.contains("fail"))
    }

    @Test func dirtyImageIsRepairedOnReadWriteOpen() async throws {
        let dir = try tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/d.qcow2"
        var o = Qcow2CreateOptions()
        o.lazyRefcounts = true
        try await Qcow2Node.create(path: path, size: 16 << 20, options: o)
        // Let QEMU write with lazy refcounts and die: the dirty bit stays set and refcounts lag.
        try sh(["qemu-io", "-c", "write -P 3 0 1M", "-c", "abort", path])
        let (_, info, _) = try sh(["qemu-img", "info", "--output=json", "-U", path])
        #expect(info.contains("\"dirty-flag\": true"), "\(info)")
        let n = try await ImageOpener.open(path)
        let q = try #require(n as? Qcow2Node)
        #expect(!q.isDirty)
        #expect(try await n.read(at: 0, count: 4) == [3, 3, 3, 3])
        try await n.close()
        let (st, out, _) = try sh(["qemu-img", "check", path])
        #expect(st == 0, "\(out)")
    }

    /// Growing an image whose backing file reaches past its old end: the added area reads as
    /// zeros, never as the backing file's old data there (QEMU's bdrv_co_truncate zeroes it;
    /// iotests 292 shrinks to 520k and grows to 567k). Same reads and the same map as qemu-img
    /// doing the same resizes.
    @Test(arguments: [true, false])
    func growingOverALongerBackingFileReadsZeros(shrinkFirst: Bool) async throws {
        let dir = try tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let base = dir + "/b.qcow2"
        try sh(["qemu-img", "create", "-q", "-f", "qcow2", base, "1M"])
        try sh(["qemu-io", "-c", "write -P 0x11 0 1M", base])
        for name in ["ours", "qemu"] {
            let size = shrinkFirst ? "1M" : "256k"
            try sh(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", "\(dir)/\(name).qcow2", size])
        }
        let q = try #require(try await ImageOpener.open(dir + "/ours.qcow2") as? Qcow2Node)
        if shrinkFirst { try await q.truncate(to: 520 << 10, preallocation: .off) }
        try await q.truncate(to: 567 << 10, preallocation: .off)
        let keep: Int64 = shrinkFirst ? 520 << 10 : 256 << 10
        #expect(try await q.read(at: 0, count: Int(keep)).allSatisfy { $0 == 0x11 })
        #expect(try await q.read(at: keep, count: Int((567 << 10) - keep)).allSatisfy { $0 == 0 },
                "the grown area reads zeros, not the backing file's data")
        try await q.close()
        if shrinkFirst { try sh(["qemu-img", "resize", "-q", "--shrink", dir + "/qemu.qcow2", "520k"]) }
        try sh(["qemu-img", "resize", "-q", dir + "/qemu.qcow2", "567k"])
        let (_, ours, _) = try sh(["qemu-img", "map", "--output=json", dir + "/ours.qcow2"])
        let (_, qemu, _) = try sh(["qemu-img", "map", "--output=json", dir + "/qemu.qcow2"])
        #expect(ours == qemu)
        let (st, cmp, _) = try sh(["qemu-img", "compare", dir + "/ours.qcow2", dir + "/qemu.qcow2"])
        #expect(st == 0, "\(cmp)")
        let (cst, check, _) = try sh(["qemu-img", "check", dir + "/ours.qcow2"])
        #expect(cst == 0, "\(check)")
    }
}
