import Foundation
import Glibc
import Testing
import TestSupport
import QBlock
@testable import QBlockCore
@testable import QBlockGraph
@testable import QBlockDrivers
@testable import QBlockOpen

/// QEMU's test drivers: blkdebug (error injection at qcow2's events), blkverify, null-co.
@Suite struct TestDriversTests {
    /// A qcow2 image of 4 MiB with 64 KiB of 0x5a at offset 0, and a blkdebug config file.
    static func fixture(config: String) async throws -> (image: String, config: String) {
        let dir = try tempDir()
        let image = dir + "/t.qcow2"
        try await Qcow2Format.create(path: image, size: 4 << 20, options: [])
        let node = try await ImageOpener.open(image, options: OpenOptions(format: "qcow2"))
        try await node.write(at: 0, bytes: [UInt8](repeating: 0x5a, count: 65536))
        try await node.close()
        let conf = dir + "/blkdebug.conf"
        try config.write(toFile: conf, atomically: true, encoding: .utf8)
        return (image, conf)
    }

    static func errno(_ body: () async throws -> Void) async -> Int32? {
        do { try await body() } catch let e as BlockError { return e.errno } catch { return -1 }
        return nil
    }

    @Test func configFileParsesBothGroups() throws {
        let rules = try BlkdebugConfig.parse("""
            # comment
            [inject-error]
            event = "l2_update"
            errno = "28"
            sector = "8"
            once ="on"

            [set-state]
            event = "read_aio"
            state = "1"
            new_state = "2"
            """)
        #expect(rules == [
            BlkdebugRule(event: .l2Update, action: .injectError(errno: ENOSPC, ioTypes: BlkdebugIOType.defaultSet, offset: 4096, once: true, immediately: false)),
            BlkdebugRule(event: .readAio, state: 1, action: .setState(newState: 2)),
        ])
        #expect(throws: BlockError.self) { try BlkdebugConfig.parse("[inject-error]\nevent = \"no_such_event\"\n") }
        #expect(throws: BlockError.self) { try BlkdebugConfig.parse("event = \"read_aio\"\n") }
    }

    @Test func readAioInjectsEIOIntoTheRead() async throws {
        let f = try await Self.fixture(config: "[inject-error]\nevent = \"read_aio\"\nerrno = \"5\"\nonce = \"on\"\n")
        let node = try await ImageOpener.open("blkdebug:\(f.config):\(f.image)", options: OpenOptions(format: "qcow2"))
        // Unallocated clusters read as zeros without touching the file: no event, no error.
        #expect(try await node.read(at: 1 << 20, count: 512) == [UInt8](repeating: 0, count: 512))
        // The read of allocated data reports read_aio; the read that follows it fails, once.
        #expect(await Self.errno { _ = try await node.read(at: 0, count: 512) } == EIO)
        #expect(try await node.read(at: 0, count: 512) == [UInt8](repeating: 0x5a, count: 512))
        try await node.close()
    }

    @Test func writeAioWithSectorOnlyFailsThatRange() async throws {
        // Once armed, the rule fails only requests covering its sector of the file (here the
        // host cluster of guest offset 0), and stays armed.
        let f = try await Self.fixture(config: "")
        let plain = try await ImageOpener.open(f.image, options: OpenOptions(format: "qcow2"))
        let host = try #require(try await plain.blockStatus(at: 0, length: 512).hostOffset)
        try await plain.close()
        try "[inject-error]\nevent = \"write_aio\"\nerrno = \"28\"\nsector = \"\(host / 512)\"\n"
            .write(toFile: f.config, atomically: true, encoding: .utf8)
        let node = try await ImageOpener.open("blkdebug:\(f.config):\(f.image)", options: OpenOptions(format: "qcow2"))
        try await node.write(at: 1 << 20, bytes: [UInt8](repeating: 7, count: 65536))
        #expect(await Self.errno { try await node.write(at: 0, bytes: [1, 2, 3]) } == ENOSPC)
        #expect(await Self.errno { try await node.write(at: 0, bytes: [4]) } == ENOSPC)
        try await node.write(at: 512, bytes: [4])   // does not cover the sector
        #expect(try await node.read(at: 1 << 20, count: 2) == [7, 7])
        try await node.close()
    }

    @Test func setStateGatesARule() async throws {
        let f = try await Self.fixture(config: """
            [set-state]
            state = "1"
            event = "read_aio"
            new_state = "2"

            [inject-error]
            state = "2"
            event = "read_aio"
            errno = "28"
            once = "on"
            """)
        let node = try await ImageOpener.open("blkdebug:\(f.config):\(f.image)", options: OpenOptions(format: "qcow2"))
        let debug = try #require(node.file?.innermostDriver as? BlkdebugNode)
        #expect(debug.currentState == 1)
        _ = try await node.read(at: 0, count: 512)          // state 1: only the transition
        #expect(debug.currentState == 2)
        #expect(await Self.errno { _ = try await node.read(at: 0, count: 512) } == ENOSPC)
        try await node.close()
    }

    @Test func l2UpdateFailsTheMetadataWrite() async throws {
        let f = try await Self.fixture(config: "[inject-error]\nevent = \"l2_update\"\nerrno = \"5\"\nimmediately = \"on\"\nonce = \"off\"\n")
        let node = try await ImageOpener.open("blkdebug:\(f.config):\(f.image)", options: OpenOptions(format: "qcow2"))
        // Allocating a cluster dirties an L2 table; writing it back (at the flush) fails.
        try await node.write(at: 2 << 20, bytes: [9])
        #expect(await Self.errno { try await node.flush() } == EIO)
        try? await node.close()
    }

    @Test func blkdebugWithoutConfigPassesEverythingThrough() async throws {
        let f = try await Self.fixture(config: "")
        let node = try await ImageOpener.open("blkdebug::\(f.image)", options: OpenOptions())
        #expect(node.driverName == "qcow2")
        #expect(try await node.read(at: 0, count: 4) == [0x5a, 0x5a, 0x5a, 0x5a])
        try await node.close()
        await #expect(throws: BlockError.self) { try await ImageOpener.open("blkdebug:nocolon", options: OpenOptions()) }
    }

    @Test func blkverifyDetectsAMismatch() async throws {
        let dir = try tempDir()
        var a = [UInt8](repeating: 1, count: 8192)
        try Data(a).write(to: URL(fileURLWithPath: dir + "/raw.img"))
        a[5000] = 2
        try Data(a).write(to: URL(fileURLWithPath: dir + "/test.img"))
        let node = try await ImageOpener.open("blkverify:\(dir)/raw.img:\(dir)/test.img", options: OpenOptions(format: "raw"))
        #expect(try await node.read(at: 0, count: 4096) == [UInt8](repeating: 1, count: 4096))
        do {
            _ = try await node.read(at: 4096, count: 4096)
            Issue.record("the mismatch was not detected")
        } catch let e as BlockError {
            #expect(e.message == "blkverify: read offset=4096 bytes=4096 contents mismatch at offset 5000")
        }
        // Writes go to both, after which they agree again.
        try await node.write(at: 4096, bytes: [UInt8](repeating: 3, count: 4096))
        #expect(try await node.read(at: 4096, count: 4096) == [UInt8](repeating: 3, count: 4096))
        try await node.close()
    }

    @Test func nullCoHasASizeAndDropsWrites() async throws {
        let node = try await ImageOpener.open("null-co://", options: OpenOptions(format: "raw"))
        #expect(node.length == 1 << 30)
        try await node.write(at: 0, bytes: [1, 2, 3])
        let status = try await node.blockStatus(at: 0, length: 4096)
        #expect(status.length == 4096)
        try await node.close()
        let zeroes = NullNode(driverName: "null-aio", length: 4096, readZeroes: true)
        let buf = AlignedBuffer(count: 512)
        buf.withUnsafeMutableBytes { _ = memset($0.baseAddress!, 0xff, 512) }
        try await buf.withUnsafeMutableBytes { try await zeroes.read(at: 0, into: $0) }
        #expect(buf.bytes == [UInt8](repeating: 0, count: 512))
        #expect(try await zeroes.blockStatus(at: 0, length: 4096).flags.contains(.zero))
        await #expect(throws: BlockError.self) { try await ImageOpener.open("null-co://x", options: OpenOptions(format: "raw")) }
    }

    @Test func breakpointSuspendsUntilResumed() async throws {
        let f = try await Self.fixture(config: "")
        let node = try await ImageOpener.open("blkdebug::\(f.image)", options: OpenOptions(format: "qcow2"))
        let b = try #require(node.debugBreakpointNode)
        b.setBreakpoint(event: .writeAio, tag: "A")
        let write = Task { try await node.write(at: 0, bytes: [0x11]) }
        while !b.isSuspended(tag: "A") { try await Task.sleep(nanoseconds: 100_000) }
        #expect(!b.resume(tag: "B"))
        #expect(b.resume(tag: "A"))
        try await write.value
        #expect(try await node.read(at: 0, count: 2) == [0x11, 0x5a])
        #expect(!b.removeBreakpoint(tag: "A"))
        try await node.close()
    }

    @Test func noneEventFiresAtOpen() async throws {
        let f = try await Self.fixture(config: "[set-state]\nevent = \"none\"\nnew_state = \"5\"\n[inject-error]\nevent = \"none\"\niotype = \"flush\"\n")
        let node = try await ImageOpener.open("blkdebug:\(f.config):\(f.image)", options: OpenOptions(format: "raw"))
        let debug = try #require(node.file?.innermostDriver as? BlkdebugNode)
        #expect(debug.currentState == 5)
        // Only flushes fail: the rule's iotype; and only flushes with a write to reach the
        // disk for (QEMU skips a flush with no write since the last one).
        _ = try await node.read(at: 0, count: 512)
        try await node.flush()
        try await node.write(at: 0, bytes: [UInt8](repeating: 1, count: 512))
        #expect(await Self.errno { try await node.flush() } == EIO)
        try? await node.close()
    }
}
