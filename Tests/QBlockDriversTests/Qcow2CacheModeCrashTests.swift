import Foundation
import Testing
import TestSupport
import QBlock

/// Kills a qcow2 writer at random instants under each cache mode, with and without a backing
/// file: `qemu-img check` must find no corruption (leaks are allowed), the image must read the
/// same through qemu-img and through QBlock, every round before a completed flush must read
/// back and, in the write-through modes, every acknowledged request too (QEMU's contract for
/// `cache=writethrough` and `directsync`: a completed write is on disk).
@Suite(.enabled(if: haveQemuImg, "qemu-img is not installed; `make test` installs qemu-utils"))
struct Qcow2CacheModeCrashTests {
    struct Trial: Sendable, CustomStringConvertible {
        var seed: UInt64
        var cache: CacheMode
        var aio: AIOMode
        var clusterSize: Int
        var backing: Bool
        var delay: Double
        var description: String {
            "seed=\(seed) cache=\(cache.rawValue) aio=\(aio.rawValue) cluster_size=\(clusterSize) backing=\(backing) kill after \(delay)s"
        }
    }

    static let trials: [Trial] = [
        Trial(seed: 21, cache: .writethrough, aio: .threads, clusterSize: 65536, backing: false, delay: 0.2),
        Trial(seed: 22, cache: .writethrough, aio: .ioUring, clusterSize: 4096, backing: true, delay: 0.35),
        Trial(seed: 23, cache: .directsync, aio: .threads, clusterSize: 65536, backing: true, delay: 0.3),
        Trial(seed: 24, cache: .directsync, aio: .ioUring, clusterSize: 16384, backing: false, delay: 0.25),
        Trial(seed: 25, cache: .none, aio: .ioUring, clusterSize: 65536, backing: true, delay: 0.3),
        Trial(seed: 26, cache: .writeback, aio: .threads, clusterSize: 8192, backing: true, delay: 0.15),
    ]

    @Test(arguments: trials)
    func killUnderCacheMode(_ trial: Trial) async throws {
        try await Self.run(trial)
    }

    /// The long campaign (`make soak`): QBLOCK_CRASH_TRIALS random trials (0 in `make test`),
    /// each printed with its seed so a failure can be replayed as a fixed trial above.
    @Test func soak() async throws {
        let count = Int(ProcessInfo.processInfo.environment["QBLOCK_CRASH_TRIALS"] ?? "") ?? 0
        guard count > 0 else { return }
        var rng = SystemRandomNumberGenerator()
        let caches: [CacheMode] = [.writethrough, .directsync, .none, .writeback]
        for _ in 0..<count {
            let trial = Trial(seed: UInt64.random(in: 1...UInt64(1 << 40), using: &rng),
                              cache: caches.randomElement(using: &rng)!,
                              aio: Bool.random(using: &rng) ? .threads : .ioUring,
                              clusterSize: [512, 4096, 16384, 65536, 2 << 20].randomElement(using: &rng)!,
                              backing: Bool.random(using: &rng),
                              delay: Double.random(in: 0.02...1.0, using: &rng))
            try await Self.run(trial)
        }
    }

    static func run(_ trial: Trial) async throws {
        guard let stress = Qcow2CrashTests.stressBinary else {
            Issue.record("qblock-stress executable not found next to the tests")
            return
        }
        print("cache-mode crash trial: \(trial)")
        let dir = try tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let size = 16 << 20
        let path = dir + "/crash.qcow2"
        var initial = [UInt8](repeating: 0, count: size)
        if trial.backing {
            // Every 512-byte sector of the backing file holds its own non-zero pattern, so a
            // cluster copied from the wrong place or not at all shows.
            for i in stride(from: 0, to: size, by: 512) {
                let v = UInt8(truncatingIfNeeded: (i >> 9) % 251 + 2)
                for j in i..<(i + 512) { initial[j] = v }
            }
            let base = dir + "/base.raw"
            #expect(FileManager.default.createFile(atPath: base, contents: Data(initial)))
            let (st, o, e) = try sh(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=\(trial.clusterSize)",
                                     "-b", base, "-F", "raw", path])
            #expect(st == 0, "\(o)\(e)")
        } else {
            let (st, o, e) = try sh(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=\(trial.clusterSize)", path, "\(size)"])
            #expect(st == 0, "\(o)\(e)")
        }

        let p = Process()
        p.executableURL = URL(fileURLWithPath: stress)
        p.arguments = [path, String(trial.seed), "1000", trial.cache.rawValue, trial.aio.rawValue]
        let out = Pipe()
        let err = Pipe()
        p.standardOutput = out
        p.standardError = err
        try p.run()
        try await Task.sleep(for: .seconds(trial.delay))
        kill(p.processIdentifier, SIGKILL)
        let data = out.fileHandleForReading.readDataToEndOfFile()
        let errData = err.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        #expect(errData.isEmpty, "\(trial): the writer failed: \(String(decoding: errData, as: UTF8.self))")
        let model = StressModel(seed: trial.seed, initial: initial, output: String(decoding: data, as: UTF8.self),
                                writeThrough: trial.cache.writeThrough)
        print("cache-mode crash trial seed=\(trial.seed): last flushed round \(model.flushedRound), \(model.durableAfterFlush) acknowledged requests after it")

        // The kernel may hold the image's locks for a moment after the kill (io_uring teardown).
        var (st, outText, errText) = try sh(["qemu-img", "check", path])
        for _ in 0..<50 where errText.contains("lock") {
            try await Task.sleep(for: .milliseconds(100))
            (st, outText, errText) = try sh(["qemu-img", "check", path])
        }
        #expect(st == 0 || st == 3, "\(trial): qemu-img check exit \(st): \(outText) \(errText)")

        let raw = dir + "/out.raw"
        let (cs, co, ce) = try sh(["qemu-img", "convert", "-U", "-O", "raw", path, raw])
        #expect(cs == 0, "\(trial): qemu-img convert: \(co)\(ce)")
        let viaQemu = [UInt8]((try? Data(contentsOf: URL(fileURLWithPath: raw))) ?? Data())
        #expect(viaQemu.count == size, "\(trial): qemu-img read \(viaQemu.count) bytes")
        if viaQemu.count == size, let bad = model.firstMismatch(viaQemu) {
            Issue.record("\(trial): a durable byte is wrong at offset \(bad) (qemu-img reads \(viaQemu[bad]), expected \(model.bytes[bad]))")
        }

        let node = try await ImageOpener.open(path, options: OpenOptions(readOnly: true))
        let ours = try await node.read(at: 0, count: size)
        try await node.close()
        #expect(ours == viaQemu, "\(trial): QBlock and qemu-img read the killed image differently")
    }
}
