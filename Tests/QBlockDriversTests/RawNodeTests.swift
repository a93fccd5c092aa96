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

@Suite struct RawNodeTests {
    @Test func passesThroughAndMarksAllocated() async throws {
        let dir = TempDir()
        let path = dir.file("r.raw")
        try truncateFile(path, to: 1 << 20)
        try writeFile(path, at: 65536, [UInt8](repeating: 3, count: 4096))
        let node = try await ImageOpener.open(path, options: OpenOptions(format: "raw"))
        #expect(node.driverName == "raw")
        #expect(node.length == 1 << 20)
        let hole = try await node.blockStatus(at: 0, length: 1 << 20)
        #expect(hole.flags == [.zero, .allocated])
        let data = try await node.blockStatus(at: 65536, length: 1 << 20 - 65536)
        #expect(data.flags.contains(.data) && data.flags.contains(.allocated))
        var buf = [UInt8](repeating: 0, count: 4096)
        buf = try await read(node, at: 65536, count: buf.count)
        #expect(buf.allSatisfy { $0 == 3 })
        try await node.close()
    }

    @Test func windowOffsetsRequests() async throws {
        let dir = TempDir()
        let path = dir.file("w.raw")
        try writeFile(path, at: 0, (0..<8192).map { UInt8(truncatingIfNeeded: $0 / 16) })
        let file = try FileNode(path: path, readOnly: false)
        let raw = RawNode(file: file, offset: 4096, size: 2048)
        #expect(raw.length == 2048)
        var buf = [UInt8](repeating: 0, count: 16)
        buf = try await read(raw, at: 0, count: buf.count)
        #expect(buf.allSatisfy { $0 == UInt8(truncatingIfNeeded: 4096 / 16) })
        try await write(raw, at: 16, [UInt8](repeating: 0xee, count: 16))
        var direct = [UInt8](repeating: 0, count: 16)
        direct = try await read(file, at: 4096 + 16, count: direct.count)
        #expect(direct.allSatisfy { $0 == 0xee })
        await #expect(throws: BlockError.self) { try await raw.truncate(to: 4096, preallocation: .off) }
        try await raw.close()
    }

    @Test func truncateResizesTheFile() async throws {
        let dir = TempDir()
        let path = dir.file("g.raw")
        try await ImageCreator.create(format: "raw", path: path, size: 65536)
        let node = try await ImageOpener.open(path, options: OpenOptions(format: "raw"))
        try await node.truncate(to: 1 << 20, preallocation: .off)
        #expect(node.length == 1 << 20)
        try await node.close()
    }
}
