import Foundation
import Testing
import TestSupport
import QBlock

/// An unaligned write to an `O_DIRECT` file is a read-modify-write of the aligned blocks
/// around it. A write that overlaps those blocks and runs at the same time must not be undone
/// by the read-modify-write's stale copy (QEMU serialises such requests).
@Suite struct FileRMWRaceTests {
    @Test(arguments: [AIOMode.threads, .ioUring])
    func alignedWriteIsNotUndoneByAConcurrentReadModifyWrite(aio: AIOMode) async throws {
        let dir = TempDir("rmw")
        let path = dir.file("x.raw")
        let blocks = 96
        try truncateFile(path, to: Int64(blocks * 4096))
        let node = try FileNode(path: path, readOnly: false, cache: .none, aio: aio)
        defer { Task { try? await node.close() } }
        // A 4 KiB block is aligned for any O_DIRECT alignment (512 or 4096).
        let a = 4096
        for round in 0..<4 {
            let fill = UInt8(round * 2 + 1), patch = UInt8(round * 2 + 2)
            try await withThrowingTaskGroup(of: Void.self) { g in
                for b in 0..<blocks {
                    let base = Int64(b * a)
                    // The aligned write (or, every third block from the second round on, a
                    // zeroing) of the whole block and an unaligned patch inside it.
                    let zero = round > 0 && b % 3 == 0
                    g.addTask {
                        if zero {
                            try await node.writeZeroes(at: base, length: Int64(a), flags: [])
                            return
                        }
                        let buf = AlignedBuffer(count: a, alignment: a)
                        try await buf.withUnsafeMutableBytes { p in
                            p.initializeMemory(as: UInt8.self, repeating: fill)
                            try await node.write(at: base, from: UnsafeRawBufferPointer(p), flags: [])
                        }
                    }
                    g.addTask {
                        try await node.write(at: base + 100, bytes: [UInt8](repeating: patch, count: 100))
                    }
                }
                try await g.waitForAll()
            }
            let got = try await node.read(at: 0, count: blocks * a)
            for b in 0..<blocks {
                let block = got[(b * a)..<((b + 1) * a)]
                // Either order is fine; an old byte outside the patch means the aligned write was lost.
                let want: UInt8 = round > 0 && b % 3 == 0 ? 0 : fill
                let lost = block.enumerated().contains { i, v in (i < 100 || i >= 200) && v != want }
                #expect(!lost, "round \(round) block \(b): the aligned write was undone by the read-modify-write")
                if lost { return }
            }
        }
    }
}
