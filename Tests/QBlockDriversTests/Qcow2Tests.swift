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




@Suite struct Qcow2BasicTests {
    @Test(arguments: [(65536, 3), (512, 3), (4096, 2), (2 << 20, 3)])
    func createWriteReadCheck(clusterSize: Int, version: Int) async throws {
        let dir = try tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/a.qcow2"
        var o = Qcow2CreateOptions()
        o.clusterSize = clusterSize
        o.version = version
        try await Qcow2Node.create(path: path, size: 64 << 20, options: o)
        let node = try await ImageOpener.open(path)
        let data = (0..<100_000).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 3) }
        try await node.write(at: 12345, bytes: data)
        try await node.write(at: 40 << 20, bytes: [UInt8](repeating: 0xab, count: 70000))
        let back = try await node.read(at: 12345, count: data.count)
        #expect(back == data)
        let z = try await node.read(at: 0, count: 12345)
        #expect(z == [UInt8](repeating: 0, count: 12345))
        try await node.close()
        if haveQemuImg {
            let (st, out, err) = try sh(["qemu-img", "check", path])
            #expect(st == 0, "qemu-img check: \(out) \(err)")
            let (st2, out2, _) = try sh(["qemu-io", "-r", "-c", "read -P 0xab \(40 << 20) 70000", path])
            #expect(st2 == 0 && !out2.contains("fail"), "\(out2)")
        }
    }
}

@Suite struct Qcow2BoundsTests {
    @Test func requestsBeyondTheEndFailCleanly() async throws {
        let dir = try tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/b.qcow2"
        try await Qcow2Node.create(path: path, size: 1 << 20, options: Qcow2CreateOptions())
        let n = try await ImageOpener.open(path)
        await #expect(throws: BlockError.self) { try await n.write(at: (1 << 20) - 10, bytes: [UInt8](repeating: 1, count: 20)) }
        await #expect(throws: BlockError.self) { _ = try await n.read(at: 1 << 40, count: 512) }
        await #expect(throws: BlockError.self) { try await n.writeZeroes(at: 1 << 30, length: 512, flags: []) }
        await #expect(throws: BlockError.self) { try await n.discard(at: -1, length: 512) }
        try await n.close()
    }
}
