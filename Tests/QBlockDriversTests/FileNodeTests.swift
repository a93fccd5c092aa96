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

@Suite struct FileNodeTests {
    /// Probing reads the header through an aligned buffer under `O_DIRECT`: a qcow2 image
    /// opened with `cache=none` and no format is qcow2 (it probed as raw before). Skipped
    /// where the file system refuses `O_DIRECT` (tmpfs).
    @Test func probingUnderODirect() async throws {
        let dir = TempDir()
        let path = dir.file("a.qcow2")
        try await ImageCreator.create(format: "qcow2", path: path, size: 1 << 20)
        let file: FileNode
        do { file = try FileNode(path: path, readOnly: true, cache: .none, locking: false) } catch let e as BlockError where e.code == .unsupported {
            return
        }
        let head = file.probeBytes(count: 104)
        #expect(head.count == 104)
        #expect(head.prefix(4) == [0x51, 0x46, 0x49, 0xfb])
        #expect(file.probeBytes(count: 5000).count == 5000)
        try await file.close()
        let node = try await ImageOpener.open(path, options: OpenOptions(readOnly: true, cache: .none))
        #expect(node.driverName == "qcow2")
        try await node.close()
    }

    @Test func writeReadRoundTrip() async throws {
        let dir = TempDir()
        let path = dir.file("a.raw")
        try truncateFile(path, to: 1 << 20)
        let f = try FileNode(path: path, readOnly: false)
        let data = (0..<10000).map { UInt8(truncatingIfNeeded: $0 &* 7) }
        try await write(f, at: 12345, data)
        var back = [UInt8](repeating: 0, count: data.count)
        back = try await read(f, at: 12345, count: back.count)
        #expect(back == data)
        // Past the end reads as zeros.
        var tail = [UInt8](repeating: 1, count: 100)
        tail = try await read(f, at: (1 << 20) - 50, count: tail.count)
        #expect(tail.allSatisfy { $0 == 0 })
        try await f.close()
    }

    @Test func writeZeroesAndDiscard() async throws {
        let dir = TempDir()
        let path = dir.file("z.raw")
        try writeFile(path, at: 0, [UInt8](repeating: 0xff, count: 1 << 20))
        let f = try FileNode(path: path, readOnly: false)
        try await f.writeZeroes(at: 65536, length: 65536, flags: [])
        try await f.writeZeroes(at: 262144, length: 131072, flags: [.mayUnmap])
        var buf = [UInt8](repeating: 1, count: 65536)
        buf = try await read(f, at: 65536, count: buf.count)
        #expect(buf.allSatisfy { $0 == 0 })
        try await f.discard(at: 524288, length: 65536)
        let s = try await f.blockStatus(at: 262144, length: 131072)
        #expect(s.flags.contains(.zero))
        #expect(s.hostOffset == 262144)
        try await f.close()
    }

    @Test func blockStatusFollowsHoles() async throws {
        let dir = TempDir()
        let path = dir.file("sparse.raw")
        try truncateFile(path, to: 4 << 20)
        try writeFile(path, at: 1 << 20, [UInt8](repeating: 0xab, count: 65536))
        let f = try FileNode(path: path, readOnly: true)
        let hole = try await f.blockStatus(at: 0, length: 4 << 20)
        #expect(hole.flags.contains(.zero) && !hole.flags.contains(.data))
        #expect(hole.length == 1 << 20)
        let data = try await f.blockStatus(at: 1 << 20, length: 3 << 20)
        #expect(data.flags.contains(.data) && data.flags.contains(.allocated))
        #expect(data.length == 65536)
        #expect(data.hostOffset == 1 << 20)
        try await f.close()
    }

    @Test func truncateGrowsAndShrinks() async throws {
        let dir = TempDir()
        let path = dir.file("t.raw")
        try truncateFile(path, to: 4096)
        let f = try FileNode(path: path, readOnly: false)
        try await f.truncate(to: 1 << 20, preallocation: .off)
        #expect(f.length == 1 << 20)
        try await f.truncate(to: 2 << 20, preallocation: .full)
        #expect(f.allocatedSize >= 1 << 20)
        try await f.truncate(to: 512, preallocation: .off)
        #expect(f.length == 512)
        try await f.close()
        let attrs = try FileManager.default.attributesOfItem(atPath: path)
        #expect((attrs[.size] as? NSNumber)?.int64Value == 512)
    }

    @Test func readOnlyRefusesWrites() async throws {
        let dir = TempDir()
        let path = dir.file("ro.raw")
        try truncateFile(path, to: 4096)
        let f = try FileNode(path: path, readOnly: true)
        await #expect(throws: BlockError.self) {
            try await write(f, at: 0, [UInt8](repeating: 1, count: 512))
        }
        try await f.close()
    }

    // MARK: Locking against QEMU

    /// Starts `qemu-io` holding `path` open read-write until its stdin is closed.
    static func holdWithQemuIO(_ path: String, format: String) throws -> (Process, Pipe) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: Tools.which("qemu-io") ?? "/usr/bin/qemu-io")
        p.arguments = ["-f", format, path]
        let stdin = Pipe()
        p.standardInput = stdin
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle.nullDevice
        try p.run()
        return (p, stdin)
    }

    @Test(.enabled(if: Tools.qemuAvailable, Comment(rawValue: Tools.qemuMissing)))
    func openFailsWhileQemuHoldsTheImage() async throws {
        let dir = TempDir()
        let path = dir.file("held.qcow2")
        try mustRun("qemu-img", "create", "-q", "-f", "qcow2", path, "1M")
        let (proc, stdin) = try Self.holdWithQemuIO(path, format: "qcow2")
        defer { try? stdin.fileHandleForWriting.close(); proc.waitUntilExit() }
        // Open as a qcow2 reader does (consistent read; share only read and unchanged writes).
        var failure: BlockError?
        for _ in 0..<100 {
            do {
                let f = try FileNode(path: path, readOnly: true, perm: [.consistentRead], shared: [.consistentRead, .writeUnchanged])
                try await f.close()
                try await Task.sleep(nanoseconds: 50_000_000)
            } catch let e as BlockError {
                failure = e
                break
            }
        }
        let e = try #require(failure)
        #expect(e.code == .locked)
        #expect(e.message == "Failed to get shared \"write\" lock\nIs another process using the image [\(path)]?")
        // With everything shared (-U), the same open succeeds.
        let shared = try FileNode(path: path, readOnly: true, perm: [.consistentRead], shared: .all)
        try await shared.close()
    }

    @Test(.enabled(if: Tools.qemuAvailable, Comment(rawValue: Tools.qemuMissing)))
    func qemuFailsWhileWeHoldTheImage() async throws {
        let dir = TempDir()
        let path = dir.file("ours.qcow2")
        try mustRun("qemu-img", "create", "-q", "-f", "qcow2", path, "1M")
        let f = try FileNode(path: path, readOnly: false, perm: [.consistentRead, .write, .resize],
                             shared: [.consistentRead, .writeUnchanged])
        let r = try run("qemu-img", "info", path)
        #expect(r.status == 1)
        #expect(r.stderr == "qemu-img: Could not open '\(path)': Failed to get shared \"write\" lock\nIs another process using the image [\(path)]?\n")
        try mustRun("qemu-img", "info", "-U", path)
        try await f.close()
        try mustRun("qemu-img", "info", path)
    }
}
