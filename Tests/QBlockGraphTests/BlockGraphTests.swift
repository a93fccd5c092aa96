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

/// A driver whose writes take a while, to observe draining.
private final class SlowMemory: BlockDriver, @unchecked Sendable {
    let driverName = "slow", filename: String, length: Int64 = 1 << 20
    let isReadOnly = false, requestAlignment = 1
    var file: (any BlockDriver)? { nil }
    var backing: (any BlockDriver)? { nil }
    private let lock = PosixMutex()
    private var data = [UInt8](repeating: 0, count: 1 << 20)
    private(set) var writes = 0
    init(_ name: String) { filename = name }
    func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws {
        lock.withLock { data.withUnsafeBytes { buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[Int(offset)..<Int(offset) + buffer.count])) } }
    }
    func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags) async throws {
        try await Task.sleep(nanoseconds: 2_000_000)
        lock.withLock {
            data.withUnsafeMutableBytes { UnsafeMutableRawBufferPointer(rebasing: $0[Int(offset)..<Int(offset) + buffer.count]).copyMemory(from: buffer) }
            writes += 1
        }
    }
    func writeZeroes(at offset: Int64, length: Int64, flags: WriteFlags) async throws {}
    func discard(at offset: Int64, length: Int64) async throws {}
    func flush() async throws {}
    func blockStatus(at offset: Int64, length: Int64) async throws -> BlockStatus { BlockStatus(flags: [.data, .allocated], length: length) }
    func truncate(to length: Int64, preallocation: Preallocation) async throws {}
    func close() async throws {}
}

@Suite struct BlockGraphTests {
    @Test func writesMarkNodeBitmaps() async throws {
        let node = BlockNode(nodeName: "n", driver: SlowMemory("a"))
        let b = try DirtyBitmap(name: "b", size: node.length, granularity: 4096)
        try node.bitmaps.add(b)
        try await node.write(at: 5000, bytes: [1, 2, 3])
        #expect(b.nextDirtyArea(from: 0)! == (4096, 4096))
        #expect(throws: BlockError.self) { try node.bitmaps.add(try DirtyBitmap(name: "b", size: 1, granularity: 512)) }
    }

    /// Writers keep going while the graph switches their backend to another node: every
    /// write lands in exactly one node, and none is in flight during the switch.
    @Test func drainedSwitchNeitherLosesNorSplitsWrites() async throws {
        let graph = BlockGraph()
        let a = SlowMemory("a"), c = SlowMemory("c")
        let na = BlockNode(nodeName: "a", driver: a), nc = BlockNode(nodeName: "c", driver: c)
        try graph.add(na)
        try graph.add(nc)
        #expect(throws: BlockError.self) { try graph.add(BlockNode(nodeName: "a", driver: a)) }
        let backend = BlockBackend(name: "disk", node: na)
        graph.attach(backend)
        #expect(throws: BlockError.self) { try graph.remove(nodeNamed: "a") }
        try await withThrowingTaskGroup(of: Void.self) { group in
            for w in 0..<4 {
                group.addTask {
                    for i in 0..<20 { try await backend.write(at: Int64(w * 4096 + i), bytes: [UInt8(i)]) }
                }
            }
            try await Task.sleep(nanoseconds: 10_000_000)
            await graph.drained {
                #expect(backend.requestsInFlight == 0)
                graph.replace(na, with: nc)
            }
            try await group.waitForAll()
        }
        #expect(a.writes + c.writes == 80)
        #expect(a.writes > 0 && c.writes > 0)
        #expect(backend.node === nc)
        #expect(graph.backends(of: na).isEmpty)
        _ = try graph.remove(nodeNamed: "a")
        #expect(graph.generateNodeName().hasPrefix("#block"))
    }
}
