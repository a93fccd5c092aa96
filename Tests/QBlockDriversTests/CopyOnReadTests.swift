import Foundation
import Glibc
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

/// The copy-on-read filter on its own: reads copy what they find below the child into it.
@Suite(.serialized) struct CopyOnReadTests {
    /// Counts writes reaching a node (to see that concurrent reads copy a cluster once).
    final class CountingNode: BlockDriver, @unchecked Sendable {
        let inner: any BlockDriver
        let lock = PosixMutex()
        var writes = 0
        init(_ inner: any BlockDriver) { self.inner = inner }
        var driverName: String { inner.driverName }
        var filename: String { inner.filename }
        var length: Int64 { inner.length }
        var isReadOnly: Bool { inner.isReadOnly }
        var requestAlignment: Int { inner.requestAlignment }
        var file: (any BlockDriver)? { inner.file }
        var backing: (any BlockDriver)? { inner.backing }
        func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws { try await inner.read(at: offset, into: buffer) }
        func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags) async throws {
            lock.withLock { writes += 1 }
            try await inner.write(at: offset, from: buffer, flags: flags)
        }
        func writeZeroes(at offset: Int64, length: Int64, flags: WriteFlags) async throws {
            lock.withLock { writes += 1 }
            try await inner.writeZeroes(at: offset, length: length, flags: flags)
        }
        func discard(at offset: Int64, length: Int64) async throws { try await inner.discard(at: offset, length: length) }
        func flush() async throws { try await inner.flush() }
        func blockStatus(at offset: Int64, length: Int64) async throws -> BlockStatus { try await inner.blockStatus(at: offset, length: length) }
        func truncate(to length: Int64, preallocation: Preallocation) async throws { try await inner.truncate(to: length, preallocation: preallocation) }
        func close() async throws { try await inner.close() }
    }

    @Test func concurrentReadsOfAClusterCopyItOnce() async throws {
        guard Tools.qemuAvailable else { print(Tools.qemuMissing); return }
        let d = TempDir("cor")
        let (_, _, top) = try JobFixture.chain(d)
        let expected = try JobFixture.content(top)
        let node = try #require(try await ImageOpener.open(top) as? Qcow2Node)
        let counting = CountingNode(node)
        let cor = CopyOnReadNode(child: counting)
        // Eight readers of the same 4k inside mid's data (cluster at 512k).
        let results = try await withThrowingTaskGroup(of: [UInt8].self) { g in
            for _ in 0..<8 { g.addTask { try await cor.read(at: 520 << 10, count: 4096) } }
            var all: [[UInt8]] = []
            for try await r in g { all.append(r) }
            return all
        }
        #expect(results.allSatisfy { $0 == [UInt8](repeating: 0x22, count: 4096) })
        #expect(counting.writes == 1)
        let st = try await node.blockStatus(at: 512 << 10, length: 65536)
        #expect(st.flags.contains(.allocated))
        // Reading everything copies the rest; the content does not change.
        for off in stride(from: Int64(0), to: node.length, by: 1 << 20) { _ = try await cor.read(at: off, count: 1 << 20) }
        try await node.close()
        #expect(try JobFixture.check(top))
        #expect(try JobFixture.same(top, expected))
        let map = try mustRun("qemu-img", "map", "--output=json", top).stdout
        #expect(!map.contains("\"depth\": 1") && !map.contains("\"depth\": 2"))
    }

    @Test func bottomLimitsWhatIsCopied() async throws {
        guard Tools.qemuAvailable else { print(Tools.qemuMissing); return }
        let d = TempDir("cor")
        let (_, _, top) = try JobFixture.chain(d)
        let node = try #require(try await ImageOpener.open(top) as? Qcow2Node)
        let base = try #require(node.backingChain.last)
        let cor = CopyOnReadNode(child: node, base: base)
        _ = try await cor.read(at: 3 << 20, count: 65536)       // base only: not copied
        _ = try await cor.read(at: 512 << 10, count: 65536)     // mid: copied
        #expect(!(try await node.blockStatus(at: 3 << 20, length: 65536)).flags.contains(.allocated))
        #expect(try await node.blockStatus(at: 512 << 10, length: 65536).flags.contains(.allocated))
        try await node.close()
        #expect(try JobFixture.check(top))
    }
}
