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
}
