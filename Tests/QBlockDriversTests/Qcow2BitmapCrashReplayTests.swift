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

/// Crash consistency of persistent bitmaps: every mutating system call of a read-write
/// open (marking the bitmaps in use), some writes, and a close (storing the bitmaps) is
/// logged; the file rebuilt from every prefix of the log (a crash right after that call)
/// must open, check free of corruption (leaks are fine), and hold each bitmap either in use
/// (untrusted) or with exactly the bits it had before the open or after the close.
@Suite(.serialized, .enabled(if: BitmapFixtures.ready, Comment(rawValue: NBDHarness.missing)))
struct Qcow2BitmapCrashReplayTests {
    @Test func everyPrefixKeepsBitmapsOldOrNew() async throws {
        let dir = TempDir("bmcrash")
        let path = try BitmapFixtures.qemuImage(dir)
        let initial = try [UInt8](Data(contentsOf: URL(fileURLWithPath: path)))
        func maps(_ file: String) async throws -> [String: String]? {
            let n = try await ImageOpener.open(file, options: OpenOptions(format: "qcow2", readOnly: true, locking: false))
            var out: [String: String] = [:]
            if let q = n as? Qcow2Node {
                for b in q.persistentBitmaps.all where !b.isInconsistent { out[b.name] = BitmapFixtures.map(of: b, size: q.length) }
            }
            try await n.close()
            return out
        }
        let before = try await maps(path) ?? [:]

        let log = Qcow2CrashReplayTests.Log()
        let fd: Int32 = try await Syscalls.withRecorder(path: path, { log.add($0) }) {
            let node = try await ImageOpener.open(path, options: OpenOptions(format: "qcow2"))
            let q = try #require(node as? Qcow2Node)
            let fd = try #require(q.hostFile as? FileNode).fd
            try await write(node, at: 3 << 20, [UInt8](repeating: 9, count: 70000))
            try await node.writeZeroes(at: 12 << 20, length: 1 << 20, flags: [])
            try q.addPersistentBitmap(name: "new", granularity: 8192)
            try await write(node, at: 15 << 20, [UInt8](repeating: 1, count: 4096))
            try await q.removePersistentBitmap(named: "b0")
            try await node.close()
            return fd
        }
        let calls = log.calls
        #expect(calls.count > 20)
        let after = try await maps(path) ?? [:]
        #expect(after["new"] != nil && after["b0"] == nil && after["b1"] != before["b1"])

        var file = initial
        let probe = dir.file("probe.qcow2")
        var inUseSeen = false
        for k in 0...calls.count {
            if k > 0 { Qcow2CrashReplayTests.apply(calls[k - 1], fd: fd, to: &file) }
            #expect(FileManager.default.createFile(atPath: probe, contents: Data(file)))
            let n = try await ImageOpener.open(probe, options: OpenOptions(format: "qcow2", readOnly: true, locking: false))
            let r = try await (n as? Qcow2Node)?.check(repair: nil)
            #expect(r?.corruptions == 0, "a crash after call \(k) of \(calls.count) leaves corruption: \(r?.messages.prefix(3) ?? [])")
            let pq = try #require(n as? Qcow2Node)
            for b in pq.persistentBitmaps.all {
                if b.isInconsistent { inUseSeen = true; continue }
                let m = BitmapFixtures.map(of: b, size: pq.length)
                #expect(m == before[b.name] || m == after[b.name], "bitmap \(b.name) after call \(k) is neither old nor new")
            }
            try await n.close()
        }
        #expect(inUseSeen)
        #expect(try BitmapFixtures.checkClean(path))
    }
}
