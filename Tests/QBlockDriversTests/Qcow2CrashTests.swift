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

/// Kill the writer at a random moment: the image must pass `qemu-img check` (leaks are
/// acceptable, corruption is not) and every write acknowledged before a completed flush
/// must read back.
@Suite(.enabled(if: haveQemuImg, "qemu-img is not installed; `make test` installs qemu-utils"))
struct Qcow2CrashTests {
    static let stressBinary: String? = {
        let fm = FileManager.default
        if let exe = try? fm.destinationOfSymbolicLink(atPath: "/proc/self/exe") {
            var dir = URL(fileURLWithPath: exe).deletingLastPathComponent()
            for _ in 0..<4 {
                let p = dir.appendingPathComponent("qblock-stress").path
                if fm.isExecutableFile(atPath: p) { return p }
                dir = dir.deletingLastPathComponent()
            }
        }
        let p = Bundle.main.bundleURL.deletingLastPathComponent().appendingPathComponent("qblock-stress").path
        return fm.isExecutableFile(atPath: p) ? p : nil
    }()

    @Test(arguments: [(UInt64(11), 65536, 0.15), (UInt64(12), 4096, 0.3), (UInt64(13), 512, 0.4), (UInt64(14), 65536, 0.05), (UInt64(15), 16384, 0.6)])
    func killAtRandomMoment(seed: UInt64, clusterSize: Int, delay: Double) async throws {
        guard let stress = Self.stressBinary else {
            Issue.record("qblock-stress executable not found next to the tests")
            return
        }
        print("crash test seed=\(seed) cluster_size=\(clusterSize) kill after \(delay)s")
        let dir = try tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/crash.qcow2"
        var o = Qcow2CreateOptions()
        o.clusterSize = clusterSize
        let size = 32 << 20
        try await Qcow2Node.create(path: path, size: Int64(size), options: o)

        let p = Process()
        p.executableURL = URL(fileURLWithPath: stress)
        p.arguments = [path, String(seed), "1000"]
        let out = Pipe()
        p.standardOutput = out
        p.standardError = FileHandle.nullDevice
        try p.run()
        try await Task.sleep(for: .seconds(delay))
        kill(p.processIdentifier, SIGKILL)
        let data = out.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        let model = StressModel(seed: seed, initial: [UInt8](repeating: 0, count: size),
                                output: String(decoding: data, as: UTF8.self), writeThrough: false)
        print("crash test seed=\(seed): last flushed round \(model.flushedRound)")

        // io_uring requests still in flight when the process died keep the file (and its
        // image locks) referenced until the kernel tears the ring down: retry briefly.
        var (st, outText, errText) = try sh(["qemu-img", "check", path])
        for _ in 0..<50 where errText.contains("lock") {
            try await Task.sleep(for: .milliseconds(100))
            (st, outText, errText) = try sh(["qemu-img", "check", path])
        }
        #expect(st == 0 || st == 3, "seed \(seed): qemu-img check exit \(st): \(outText) \(errText)")

        // Rounds up to the last flush are durable; the requests after it are unknown.
        let node = try await ImageOpener.open(path, options: OpenOptions(readOnly: true))
        let got = try await node.read(at: 0, count: size)
        try await node.close()
        let bad = model.firstMismatch(got)
        #expect(bad == nil, "seed \(seed): flushed data lost at offset \(bad ?? -1)")
    }
}
