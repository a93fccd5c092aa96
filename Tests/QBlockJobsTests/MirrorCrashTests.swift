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

/// kill -9 of a process in the middle of a mirror with a persistent bitmap, then
/// `img mirror-finish`: every flushed write is on the target, and only dirty clusters are copied.
@Suite(.serialized) struct MirrorCrashTests {
    static let crashBinary: String? = {
        guard let exe = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe") else { return nil }
        var dir = URL(fileURLWithPath: exe).deletingLastPathComponent()
        for _ in 0..<4 {
            let p = dir.appendingPathComponent("qblock-mirror-crash").path
            if FileManager.default.isExecutableFile(atPath: p) { return p }
            dir = dir.deletingLastPathComponent()
        }
        return nil
    }()

    @Test(arguments: [(UInt64(1), 0.4, UInt64(2 << 20), "background"), (UInt64(2), 1.5, UInt64(0), "background"),
                      (UInt64(3), 0.9, UInt64(6 << 20), "background"), (UInt64(4), 1.2, UInt64(0), "write-blocking"),
                      (UInt64(5), 0.5, UInt64(3 << 20), "write-blocking")])
    func killThenFinishOffline(seed: UInt64, delay: Double, speed: UInt64, mode: String) async throws {
        guard Tools.qemuAvailable else { print(Tools.qemuMissing); return }
        guard let crash = Self.crashBinary else {
            Issue.record("qblock-mirror-crash executable not found next to the tests")
            return
        }
        let d = TempDir("mirror-crash")
        let src = d.file("src.qcow2"), tgt = d.file("tgt.qcow2"), bits = d.file("mirror.bitmap")
        let size: Int64 = 16 << 20
        try mustRun("qemu-img", "create", "-q", "-f", "qcow2", src, "16M")
        try mustRun("qemu-io", "-c", "write -P 0x61 0 6M", "-c", "write -P 0x62 10M 3M", src)
        try mustRun("qemu-img", "create", "-q", "-f", "qcow2", tgt, "16M")
        var model = [UInt8](try JobFixture.content(src))

        let p = Process()
        p.executableURL = URL(fileURLWithPath: crash)
        p.arguments = [src, tgt, bits, String(seed), String(speed), mode]
        let out = Pipe()
        p.standardOutput = out
        p.standardError = FileHandle.nullDevice
        try p.run()
        try await Task.sleep(nanoseconds: UInt64(delay * 1e9))
        kill(p.processIdentifier, SIGKILL)
        p.waitUntilExit()
        let lines = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self).split(separator: "\n")
        let flushed = lines.compactMap { $0.hasPrefix("FLUSHED ") ? Int($0.dropFirst(8)) : nil }.last ?? -1
        let wasReady = lines.contains("READY")
        print("mirror crash seed=\(seed) \(mode): killed after \(delay)s, \(flushed + 1) flushes, ready=\(wasReady)")
        #expect(lines.contains("STARTED"))

        // What must be there: the initial content and every flushed write; the writes
        // issued after the last flush may or may not have landed.
        let per = MirrorCrashPlan.writesPerFlush
        let durable = (flushed + 1) * per
        for i in 0..<durable {
            let w = MirrorCrashPlan.write(i, seed: seed, size: size)
            model.replaceSubrange(Int(w.offset)..<Int(w.offset) + w.length, with: repeatElement(w.byte, count: w.length))
        }
        // (Writes are 4 KiB aligned: track the blocks they touch.)
        var unknown = Set<Int>()
        for i in durable..<(durable + 2 * per) {
            let w = MirrorCrashPlan.write(i, seed: seed, size: size)
            for b in Int(w.offset) / 4096..<(Int(w.offset) + w.length) / 4096 { unknown.insert(b) }
        }
        func differingBlocks(_ a: [UInt8], _ b: [UInt8]) -> [Int] {
            a.withUnsafeBytes { x in b.withUnsafeBytes { y in
                (0..<Int(size) / 4096).filter { !unknown.contains($0) && memcmp(x.baseAddress! + $0 * 4096, y.baseAddress! + $0 * 4096, 4096) != 0 }
            } }
        }

        let finish = try mustRun("img", "mirror-finish", "-b", bits, "-f", "qcow2", "-F", "qcow2", src, tgt)
        print(finish.stdout, terminator: "")
        if wasReady {
            // Clean clusters were not copied again.
            #expect(!finish.stdout.contains("of \(size);") || finish.stdout.contains("nothing to copy")
                    || !finish.stdout.hasPrefix("Copied \(size) "))
        }
        for path in [src, tgt] {
            let content = [UInt8](try JobFixture.content(path))
            let bad = differingBlocks(content, model)
            #expect(bad.isEmpty, "\(path): flushed data missing in 4k blocks \(bad.prefix(8))")
            // A killed writer may leak clusters (exit 3), never corrupt.
            let check = try run("qemu-img", "check", path)
            #expect(check.status == 0 || check.status == 3, "\(check)")
        }
        // The target is now a copy of the source, except where unflushed writes raced the kill.
        let s = [UInt8](try JobFixture.content(src)), t = [UInt8](try JobFixture.content(tgt))
        #expect(differingBlocks(s, t).isEmpty)
        // Finishing again: nothing left.
        let again = try mustRun("img", "mirror-finish", "-b", bits, src, tgt)
        #expect(again.stdout.contains("nothing to copy"))
    }
}
