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

/// A simple in-memory model of a disk.
struct DiskModel {
    var bytes: [UInt8]
    init(size: Int) { bytes = [UInt8](repeating: 0, count: size) }
}

/// xorshift64* — a small deterministic generator so that failures reproduce from the printed seed.
struct SeededRandom: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed == 0 ? 0x9e37_79b9_7f4a_7c15 : seed }
    mutating func next() -> UInt64 {
        state ^= state >> 12
        state ^= state << 25
        state ^= state >> 27
        return state &* 2_685_821_657_736_338_717
    }
}

@Suite struct Qcow2DifferentialTests {
    /// Hundreds of random writes, zero writes and discards, many in flight at once, through a
    /// backing chain (raw base ← qcow2 mid ← qcow2 top), checked byte for byte against a model
    /// and then by qemu-img (check, and compare against the model written as raw).
    @Test(arguments: [(UInt64(1), 65536, 3), (UInt64(2), 4096, 3), (UInt64(3), 512, 3), (UInt64(4), 65536, 2), (UInt64(5), 16384, 3)])
    func randomOperationsAgainstModel(seed: UInt64, clusterSize: Int, version: Int) async throws {
        print("differential test seed=\(seed) cluster_size=\(clusterSize) version=\(version)")
        var rng = SeededRandom(seed: seed)
        let dir = try tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let size = 8 << 20
        var model = DiskModel(size: size)

        // Base: raw with some data.
        let base = dir + "/base.raw"
        #expect(FileManager.default.createFile(atPath: base, contents: nil))
        let baseNode = try await ImageOpener.open(base, options: OpenOptions(format: "raw"))
        try await baseNode.truncate(to: Int64(size), preallocation: .off)
        for _ in 0..<20 {
            let off = Int(rng.next() % UInt64(size - 70000))
            let len = Int(rng.next() % 65536) + 1
            let v = UInt8(truncatingIfNeeded: rng.next())
            let data = [UInt8](repeating: v, count: len)
            try await baseNode.write(at: Int64(off), bytes: data)
            model.bytes.replaceSubrange(off..<(off + len), with: data)
        }
        try await baseNode.close()

        var o = Qcow2CreateOptions()
        o.clusterSize = clusterSize
        o.version = version
        o.backingFile = "base.raw"
        o.backingFormat = "raw"
        let mid = dir + "/mid.qcow2"
        try await Qcow2Node.create(path: mid, size: Int64(size), options: o)
        let midNode = try await ImageOpener.open(mid)
        for _ in 0..<30 {
            let off = Int(rng.next() % UInt64(size - 70000))
            let len = Int(rng.next() % 20000) + 1
            let data = (0..<len).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
            try await midNode.write(at: Int64(off), bytes: data)
            model.bytes.replaceSubrange(off..<(off + len), with: data)
        }
        try await midNode.close()

        o.backingFile = "mid.qcow2"
        o.backingFormat = "qcow2"
        let top = dir + "/top.qcow2"
        try await Qcow2Node.create(path: top, size: Int64(size), options: o)
        let node = try await ImageOpener.open(top)

        // Rounds of concurrent operations on non-overlapping ranges, so the model's result is defined.
        for round in 0..<12 {
            var ops: [(kind: Int, off: Int, len: Int, data: [UInt8])] = []
            var taken: [Range<Int>] = []
            while ops.count < 24 {
                let len = Int(rng.next() % 3 == 0 ? rng.next() % 200_000 + 1 : rng.next() % 9000 + 1)
                let off = Int(rng.next() % UInt64(size - len))
                let r = off..<(off + len)
                if taken.contains(where: { $0.overlaps(r) }) { continue }
                taken.append(r)
                let kind = Int(rng.next() % 10)
                let data = kind < 7 ? (0..<len).map { _ in UInt8(truncatingIfNeeded: rng.next() | 1) } : []
                ops.append((kind, off, len, data))
            }
            try await withThrowingTaskGroup(of: Void.self) { g in
                for op in ops {
                    g.addTask {
                        switch op.kind {
                        case 0..<7: try await node.write(at: Int64(op.off), bytes: op.data)
                        case 7, 8: try await node.writeZeroes(at: Int64(op.off), length: Int64(op.len), flags: op.kind == 8 ? [.mayUnmap] : [])
                        default: try await node.discard(at: Int64(op.off), length: Int64(op.len))
                        }
                    }
                }
                try await g.waitForAll()
            }
            for op in ops {
                switch op.kind {
                case 0..<7: model.bytes.replaceSubrange(op.off..<(op.off + op.len), with: op.data)
                case 7, 8: model.bytes.replaceSubrange(op.off..<(op.off + op.len), with: [UInt8](repeating: 0, count: op.len))
                default:
                    // Discard drops whole clusters only; in v3 they then read as zeros, in v2
                    // (with a backing file, as here) it changes nothing, as in QEMU.
                    let cs = clusterSize
                    let s = (op.off + cs - 1) / cs * cs
                    let e = (op.off + op.len) / cs * cs
                    if e > s && version >= 3 {
                        model.bytes.replaceSubrange(s..<e, with: [UInt8](repeating: 0, count: e - s))
                    }
                }
            }
            if round % 4 == 3 { try await node.flush() }
            // Concurrent reads of random ranges must match the model.
            for _ in 0..<8 {
                let len = Int(rng.next() % 100_000) + 1
                let off = Int(rng.next() % UInt64(size - len))
                let got = try await node.read(at: Int64(off), count: len)
                if got != Array(model.bytes[off..<(off + len)]) {
                    Issue.record("seed \(seed) round \(round): mismatch reading \(len) bytes at \(off)")
                    return
                }
            }
        }
        let all = try await node.read(at: 0, count: size)
        if all != model.bytes {
            let i = zip(all, model.bytes).enumerated().first { $0.element.0 != $0.element.1 }?.offset ?? -1
            Issue.record("seed \(seed): final content differs from the model at offset \(i)")
        }
        try await node.close()

        if haveQemuImg {
            let (st, out, err) = try sh(["qemu-img", "check", top])
            #expect(st == 0, "seed \(seed): qemu-img check: \(out) \(err)")
            let modelPath = dir + "/model.raw"
            #expect(FileManager.default.createFile(atPath: modelPath, contents: Data(model.bytes)))
            let (cst, cout, cerr) = try sh(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", modelPath, top])
            #expect(cst == 0, "seed \(seed): qemu-img compare: \(cout) \(cerr)")
        }
    }
}
