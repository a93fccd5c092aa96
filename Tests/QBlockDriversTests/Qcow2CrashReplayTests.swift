import CSupport
import Foundation
import Testing
import TestSupport
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

/// Crash consistency at every write boundary: the writes a workload issues are logged in
/// order; then, for prefixes of the log (a process killed right after the k-th write), the
/// file is rebuilt and checked. Every prefix must check free of corruption (leaks are
/// acceptable), and every prefix that includes a completed flush must hold the data
/// written before that flush.
@Suite(.serialized) struct Qcow2CrashReplayTests {
    // @unchecked Sendable: `calls` is only touched with `lock` held.
    final class Log: @unchecked Sendable {
        let lock = NSLock()
        var calls: [Syscalls.RecordedCall] = []
        func add(_ c: Syscalls.RecordedCall) { lock.lock(); calls.append(c); lock.unlock() }
    }

    /// Applies recorded calls on `fd` to an in-memory copy of the file.
    static func apply(_ c: Syscalls.RecordedCall, fd: Int32, to file: inout [UInt8]) {
        switch c {
        case .pwrite(let f, let off, let data) where f == fd:
            let end = Int(off) + data.count
            if end > file.count { file.append(contentsOf: [UInt8](repeating: 0, count: end - file.count)) }
            file.replaceSubrange(Int(off)..<end, with: data)
        case .fallocate(let f, let mode, let off, let len) where f == fd:
            let keep = mode & qb_falloc_keep_size() != 0
            let zero = mode & (qb_falloc_punch_hole() | qb_falloc_zero_range()) != 0
            var end = Int(off + len)
            if end > file.count {
                if keep { end = file.count } else { file.append(contentsOf: [UInt8](repeating: 0, count: end - file.count)) }
            }
            if zero && Int(off) < end { file.replaceSubrange(Int(off)..<end, with: [UInt8](repeating: 0, count: end - Int(off))) }
        case .ftruncate(let f, let len) where f == fd:
            if Int(len) < file.count { file.removeLast(file.count - Int(len)) } else {
                file.append(contentsOf: [UInt8](repeating: 0, count: Int(len) - file.count))
            }
        default: break
        }
    }

    @Test(arguments: [(UInt64(21), 65536), (UInt64(22), 4096), (UInt64(23), 512)])
    func everyPrefixOfTheWriteLogIsConsistent(seed: UInt64, clusterSize: Int) async throws {
        print("crash replay seed=\(seed) cluster_size=\(clusterSize)")
        let dir = try tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/r.qcow2"
        var o = Qcow2CreateOptions()
        o.clusterSize = clusterSize
        let size = 4 << 20
        try await Qcow2Node.create(path: path, size: Int64(size), options: o)
        let initial = try [UInt8](Data(contentsOf: URL(fileURLWithPath: path)))
        let node = try await ImageOpener.open(path)
        let qnode = try #require(node as? Qcow2Node)
        let fd = try #require(qnode.hostFile as? FileNode).fd
        let log = Log()
        // Rounds of concurrent writes, zero writes with and without unmap; a flush after each.
        var flushMarks: [(logIndex: Int, round: Int)] = []
        let rounds = 6
        try await Syscalls.withRecorder(path: path, { log.add($0) }) {
            for round in 0..<rounds {
                let ops = StressPlan.ops(seed: seed, round: round, size: size)
                try await withThrowingTaskGroup(of: Void.self) { g in
                    for op in ops {
                        g.addTask {
                            switch op.kind {
                            case .write: try await node.write(at: Int64(op.offset), bytes: [UInt8](repeating: op.byte, count: op.length))
                            case .zero: try await node.writeZeroes(at: Int64(op.offset), length: Int64(op.length), flags: [])
                            case .zeroUnmap: try await node.writeZeroes(at: Int64(op.offset), length: Int64(op.length), flags: [.mayUnmap])
                            }
                        }
                    }
                    try await g.waitForAll()
                }
                try await node.flush()
                log.lock.withLock { flushMarks.append((log.calls.count, round)) }
            }
        }
        try await node.close()
        let calls = log.calls
        print("crash replay seed=\(seed): \(calls.count) logged calls")

        // Prefixes to try: a spread over the whole log plus every flush point.
        var prefixes = Set<Int>()
        let step = max(1, calls.count / 150)
        for k in stride(from: 0, through: calls.count, by: step) { prefixes.insert(k) }
        for m in flushMarks { prefixes.insert(m.logIndex) }
        // The content every flushed round guarantees, with the next round's bytes masked.
        var expected: [Int: [UInt8]] = [:]
        var mask: [Int: [(Int, Int)]] = [:]
        var model = [UInt8](repeating: 0, count: size)
        for r in 0..<rounds {
            for op in StressPlan.ops(seed: seed, round: r, size: size) {
                let v: UInt8 = op.kind == .write ? op.byte : 0
                model.replaceSubrange(op.offset..<(op.offset + op.length), with: repeatElement(v, count: op.length))
            }
            expected[r] = model
            mask[r] = r + 1 < rounds ? StressPlan.ops(seed: seed, round: r + 1, size: size).map { ($0.offset, $0.length) } : []
        }
        var file = initial
        var applied = 0
        let probe = dir + "/probe.qcow2"
        for (i, k) in prefixes.sorted().enumerated() {
            while applied < k { Self.apply(calls[applied], fd: fd, to: &file); applied += 1 }
            #expect(FileManager.default.createFile(atPath: probe, contents: Data(file)))
            let n = try await ImageOpener.open(probe, options: OpenOptions(readOnly: true, locking: false))
            let q = try #require(n as? Qcow2Node)
            let r = try await q.check(repair: nil)
            if r.corruptions != 0 {
                Issue.record("seed \(seed): a crash after write \(k) of \(calls.count) leaves corruption: \(r.messages.prefix(3))")
                if ProcessInfo.processInfo.environment["QBLOCK_REPLAY_DEBUG"] != nil {
                    for j in 0..<k {
                        switch calls[j] {
                        case .pwrite(_, let o, let d): print("\(j): pwrite off=0x\(String(o, radix: 16)) len=\(d.count) first8=\(d.prefix(8).map { String($0, radix: 16) })")
                        case .fallocate(_, let m, let o, let l): print("\(j): fallocate mode=\(m) off=0x\(String(o, radix: 16)) len=\(l)")
                        case .ftruncate(_, let l): print("\(j): ftruncate \(l)")
                        case .fdatasync: print("\(j): fdatasync")
                        }
                    }
                }
                try await n.close()
                return
            }
            // Data flushed before this point must be there (checked at flush points and some others).
            let atFlush = flushMarks.contains { $0.logIndex == k }
            if let lastFlushed = flushMarks.last(where: { $0.logIndex <= k })?.round, atFlush || i % 10 == 0 {
                var got = try await n.read(at: 0, count: size)
                var want = expected[lastFlushed]!
                for (off, len) in mask[lastFlushed]! {
                    got.replaceSubrange(off..<(off + len), with: repeatElement(0, count: len))
                    want.replaceSubrange(off..<(off + len), with: repeatElement(0, count: len))
                }
                let same = got.withUnsafeBytes { g in want.withUnsafeBytes { w in memcmp(g.baseAddress!, w.baseAddress!, size) == 0 } }
                if !same {
                    Issue.record("seed \(seed): after a crash at write \(k), data flushed in round \(lastFlushed) is lost")
                    try await n.close()
                    return
                }
            }
            try await n.close()
        }
    }
}
