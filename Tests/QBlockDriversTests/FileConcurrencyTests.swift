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

/// Many requests in flight on one file, through the io_uring rings and the serial write queue
/// (buffered) or straight to the rings (`O_DIRECT`), checked against an in-memory model.
@Suite(.serialized) struct FileConcurrencyTests {
    static let size = 8 << 20

    /// Rounds of 48 concurrent writes to disjoint random extents, each followed by 48
    /// concurrent reads of random extents; the file must equal the model after every round.
    @Test(arguments: [(CacheMode.writeback, UInt64(1)), (.writeback, 2), (.none, 3), (.writethrough, 4)])
    func concurrentRequestsMatchTheModel(cache: CacheMode, seed: UInt64) async throws {
        print("FileConcurrencyTests seed \(seed) cache \(cache)")
        let dir = TempDir()
        let path = dir.file("c.raw")
        try truncateFile(path, to: Int64(Self.size))
        let f = try FileNode(path: path, readOnly: false, cache: cache)
        var model = [UInt8](repeating: 0, count: Self.size)
        var rng = SplitMix(seed: seed)
        for round in 0..<4 {
            // Disjoint extents: split the file into 48 slots and write a random part of each.
            let slot = Self.size / 48 / 4096 * 4096
            var writes: [(Int64, [UInt8])] = []
            for i in 0..<48 {
                let len = Int(rng.next() % UInt64(slot / 4096)) * 4096 + 4096
                let off = i * slot + Int(rng.next() % UInt64((slot - len) / 4096 + 1)) * 4096
                let fill = UInt8(truncatingIfNeeded: rng.next())
                let data = (0..<len).map { UInt8(truncatingIfNeeded: $0 &* 31) ^ fill }
                writes.append((Int64(off), data))
                model.replaceSubrange(off..<(off + len), with: data)
            }
            try await withThrowingTaskGroup(of: Void.self) { g in
                for (off, data) in writes { g.addTask { try await write(f, at: off, data) } }
                try await g.waitForAll()
            }
            let reads: [(Int, Int)] = (0..<48).map { _ in
                let len = Int(rng.next() % 256) * 4096 + 4096
                return (Int(rng.next() % UInt64((Self.size - len) / 4096)) * 4096, len)
            }
            let m = model
            try await withThrowingTaskGroup(of: Bool.self) { g in
                for (off, len) in reads {
                    g.addTask { try await read(f, at: Int64(off), count: len) == Array(m[off..<(off + len)]) }
                }
                for try await same in g { #expect(same, "round \(round): a read differs from the model (seed \(seed))") }
            }
        }
        try await f.flush()
        try await f.close()
        #expect(FileManager.default.contents(atPath: path) == Data(model))
    }

    /// A write that fails in the middle of a queue of buffered writes fails alone, with its
    /// error; the writes queued around it land, and the file takes writes afterwards.
    @Test func aFailingQueuedWriteFailsAlone() async throws {
        let dir = TempDir()
        let path = dir.file("e.raw")
        try truncateFile(path, to: 1 << 20)
        let f = try FileNode(path: path, readOnly: false)
        let results = try await Syscalls.withInjector(path: path, { call, offset in
            call == .pwrite && offset == 5 * 65536 ? ENOSPC : nil
        }) {
            try await withThrowingTaskGroup(of: (Int, Int32?).self) { g in
                for i in 0..<16 {
                    g.addTask {
                        do {
                            try await write(f, at: Int64(i) * 65536, [UInt8](repeating: UInt8(i + 1), count: 65536))
                            return (i, nil)
                        } catch let e as BlockError {
                            return (i, e.errno)
                        }
                    }
                }
                var r: [Int: Int32?] = [:]
                for try await (i, e) in g { r[i] = e }
                return r
            }
        }
        for i in 0..<16 {
            if i == 5 {
                #expect(results[i]! == ENOSPC)
            } else {
                #expect(results[i]! == nil, "write \(i) failed")
                #expect(try await read(f, at: Int64(i) * 65536, count: 65536).allSatisfy { $0 == UInt8(i + 1) })
            }
        }
        try await write(f, at: 5 * 65536, [UInt8](repeating: 6, count: 65536))
        #expect(try await read(f, at: 5 * 65536, count: 65536).allSatisfy { $0 == 6 })
        try await f.close()
    }
}
