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

/// Images made by QEMU's tools read right with ours, and the reverse.
@Suite(.enabled(if: haveQemuImg, "qemu-img is not installed; `make test` installs qemu-utils"))
struct Qcow2InteropTests {
    /// Reads the whole image through QBlock and compares with qemu-img's raw conversion.
    func assertReadsLikeQemu(_ path: String, _ dir: String, _ context: String) async throws {
        let raw = dir + "/oracle-\(UUID().uuidString).raw"
        let (st, _, err) = try sh(["qemu-img", "convert", "-O", "raw", path, raw])
        #expect(st == 0, "qemu-img convert failed: \(err)")
        let expected = try [UInt8](Data(contentsOf: URL(fileURLWithPath: raw)))
        let node = try await ImageOpener.open(path, options: OpenOptions(readOnly: true))
        #expect(node.length == Int64(expected.count))
        let got = try await node.read(at: 0, count: expected.count)
        try await node.close()
        if got != expected {
            let i = zip(got, expected).enumerated().first { $0.element.0 != $0.element.1 }?.offset ?? -1
            Issue.record("\(context): content differs from qemu-img's at offset \(i)")
        }
    }

    @Test(arguments: ["0.10", "1.1"], [512, 4096, 65536, 2 << 20])
    func qemuWrittenImagesReadRight(compat: String, clusterSize: Int) async throws {
        let dir = try tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let base = dir + "/base.qcow2"
        let top = dir + "/top.qcow2"
        try sh(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=\(compat),cluster_size=\(clusterSize)", base, "16M"])
        try sh(["qemu-io", "-c", "write -P 0x11 0 3M", "-c", "write -P 0x22 5M 1M", "-c", "write -P 0x33 12345 7000", base])
        try sh(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=\(compat),cluster_size=\(clusterSize)",
                "-b", "base.qcow2", "-F", "qcow2", top])
        let (st, out, _) = try sh(["qemu-io", "-c", "write -P 0x44 1M 1M", "-c", "write -z 2M 512k",
                                   "-c", "discard 5M 256k", "-c", "write -P 0x55 15M 4097", top])
        #expect(st == 0, "\(out)")
        try await assertReadsLikeQemu(base, dir, "base compat=\(compat) cluster_size=\(clusterSize)")
        try await assertReadsLikeQemu(top, dir, "top compat=\(compat) cluster_size=\(clusterSize)")
    }

    @Test(arguments: ["zlib", "zstd"], [4096, 65536])
    func compressedClustersFromQemu(type: String, clusterSize: Int) async throws {
        let dir = try tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let src = dir + "/src.raw"
        var bytes = [UInt8](repeating: 0, count: 4 << 20)
        var rng = SeededRandom(seed: 42)
        for i in 0..<bytes.count where (i / 4096) % 3 != 2 {
            bytes[i] = (i / 4096) % 3 == 0 ? UInt8(truncatingIfNeeded: i / 100) : UInt8(truncatingIfNeeded: rng.next())
        }
        #expect(FileManager.default.createFile(atPath: src, contents: Data(bytes)))
        let dst = dir + "/c.qcow2"
        let (st, _, err) = try sh(["qemu-img", "convert", "-c", "-O", "qcow2", "-o", "compression_type=\(type),cluster_size=\(clusterSize)", src, dst])
        #expect(st == 0, "\(err)")
        let node = try await ImageOpener.open(dst, options: OpenOptions(readOnly: true))
        let got = try await node.read(at: 0, count: bytes.count)
        // Reads that start inside a compressed cluster.
        let part = try await node.read(at: 12345, count: 100_000)
        try await node.close()
        #expect(got == bytes, "\(type) compressed image content differs")
        #expect(part == Array(bytes[12345..<112_345]))
        // Writing over compressed clusters replaces them; qemu-img check must stay clean.
        let rw = try await ImageOpener.open(dst)
        try await rw.write(at: 8192 + 100, bytes: [UInt8](repeating: 0xee, count: 5000))
        try await rw.close()
        bytes.replaceSubrange((8192 + 100)..<(8192 + 5100), with: [UInt8](repeating: 0xee, count: 5000))
        let (cst, cout, _) = try sh(["qemu-img", "check", dst])
        #expect(cst == 0, "\(cout)")
        try await assertReadsLikeQemu(dst, dir, "after overwrite of \(type) clusters")
    }

    @Test func ourImagesOnQemuBackingAndReverse() async throws {
        let dir = try tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        // qemu base, our overlay, qemu overlay on top of ours.
        let base = dir + "/base.qcow2"
        try sh(["qemu-img", "create", "-q", "-f", "qcow2", base, "4M"])
        try sh(["qemu-io", "-c", "write -P 0x61 0 4M", base])
        var o = Qcow2CreateOptions()
        o.backingFile = "base.qcow2"
        o.backingFormat = "qcow2"
        let mid = dir + "/mid.qcow2"
        try await Qcow2Node.create(path: mid, size: 4 << 20, options: o)
        let m = try await ImageOpener.open(mid)
        try await m.write(at: 1000, bytes: [UInt8](repeating: 0x62, count: 3000))
        try await m.writeZeroes(at: 1 << 20, length: 65536, flags: [])
        try await m.close()
        let top = dir + "/top.qcow2"
        try sh(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", top])
        try sh(["qemu-io", "-c", "write -P 0x63 2M 100k", top])
        let (st, out, _) = try sh(["qemu-io", "-r", "-c", "read -P 0x61 0 1000", "-c", "read -P 0x62 1000 3000",
                                   "-c", "read -P 0 1M 64k", "-c", "read -P 0x63 2M 100k", "-c", "read -P 0x61 3M 1M", top])
        #expect(st == 0 && !out.contains("fail"), "\(out)")
        try await assertReadsLikeQemu(top, dir, "mixed chain")
        let (cst, cout, _) = try sh(["qemu-img", "check", mid])
        #expect(cst == 0, "\(cout)")
    }

    @Test func freshImageIsByteIdenticalToQemuCreate() async throws {
        let dir = try tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let a = dir + "/a.qcow2", b = dir + "/b.qcow2"
        try sh(["qemu-img", "create", "-q", "-f", "qcow2", a, "1G"])
        try await Qcow2Node.create(path: b, size: 1 << 30, options: Qcow2CreateOptions())
        let da = try Data(contentsOf: URL(fileURLWithPath: a))
        let db = try Data(contentsOf: URL(fileURLWithPath: b))
        #expect(da == db, "a fresh image must be byte-identical to qemu-img's")
    }
}
