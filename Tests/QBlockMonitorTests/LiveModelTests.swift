import Foundation
import Testing
import TestSupport

/// The randomized live-operations model test (Tests/Scripts/python/livemodel/live_model.py) run against
/// our `nbd --qmp` for a handful of seeds, and as a differential run against
/// qemu-storage-daemon for a couple. Each seed drives writer bursts, live snapshots,
/// stream, commit, copy-on-read reads and mirrors over QMP and checks every image against a
/// byte model; a failure prints the seed, a shrunk step list and its QMP commands.
///
/// - `QBLOCK_LIVEMODEL_SEED=N` reruns one seed (and only it);
/// - `QBLOCK_LIVEMODEL_SECONDS=S` runs new seeds for S seconds (`make soak`);
/// - `QBLOCK_LIVEMODEL_EXCLUDE=tag,tag` leaves step kinds out (see the script's --help);
/// - `QBLOCK_LIVEMODEL_STEPS=K` steps per seed (default 10).
@Suite(.serialized) struct LiveModelTests {
    static let script: String = {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent("Tests/Scripts/python/livemodel/live_model.py").path
    }()

    static let env = ProcessInfo.processInfo.environment
    static let fixedSeed: Int? = env["QBLOCK_LIVEMODEL_SEED"].flatMap { Int($0) }
    static let soakSeconds: Double? = env["QBLOCK_LIVEMODEL_SECONDS"].flatMap { Double($0) }
    static let exclude = env["QBLOCK_LIVEMODEL_EXCLUDE"] ?? ""
    static let steps = env["QBLOCK_LIVEMODEL_STEPS"] ?? "10"

    /// Why the suite cannot run here, or nil.
    static var missing: String? {
        guard Tools.qemuAvailable else { return Tools.qemuMissing }
        guard Tools.executable("nbd") != nil else { return "the built nbd tool is missing (swift build)" }
        guard Tools.which("python3") != nil, (try? run("python3", "-c", "import qemu.qmp"))?.status == 0 else {
            return "python3 with qemu.qmp missing (pip install qemu.qmp; make test does it)"
        }
        return nil
    }

    static var qsdMissing: String? {
        if let m = missing { return m }
        return Tools.which("qemu-storage-daemon") == nil ? "qemu-storage-daemon missing (apt-get install qemu-system-common)" : nil
    }

    /// Runs the script once; prints its output when it fails (the reproducer is in it).
    static func runScript(_ kind: String, seed: Int, steps: String = steps, shrinkSeconds: Int = 20) throws -> RunResult {
        let d = TempDir("livemodel")
        var args = [script, kind, d.path, "--seed", String(seed), "--steps", steps, "--quiet",
                    "--daemon-cmd", Tools.executable("nbd")!, "--shrink-seconds", String(shrinkSeconds)]
        if !exclude.isEmpty { args += ["--exclude", exclude] }
        let r = try run("python3", args)
        if r.status != 0 { print(r.stdout, r.stderr) }
        return r
    }

    /// The seeds of `make test` (fixed, so a failure reproduces), or the one asked for.
    static let seeds: [Int] = fixedSeed.map { [$0] } ?? [11, 22, 33, 44]

    @Test(arguments: seeds)
    func ourDaemonAgreesWithTheModel(seed: Int) throws {
        if let m = Self.missing { print("LiveModelTests skipped: \(m)"); return }
        guard Self.soakSeconds == nil else { return }
        let r = try Self.runScript("qblock", seed: seed)
        #expect(r.status == 0, "live model, seed \(seed): see the reproducer above")
    }

    /// The same step lists against qemu-storage-daemon: our daemon must agree with the model;
    /// QEMU's deviations from it are printed, not failures; the chains both leave are compared.
    @Test(arguments: fixedSeed.map { [$0] } ?? [5, 7])
    func differentialAgainstQEMU(seed: Int) throws {
        if let m = Self.qsdMissing { print("LiveModelTests differential skipped: \(m)"); return }
        guard Self.soakSeconds == nil else { return }
        let r = try Self.runScript("diff", seed: seed, steps: "8")
        for line in r.stdout.split(separator: "\n") where line.contains("QEMU DEVIATION") || line.contains("[diff") {
            print(line)
        }
        #expect(r.status == 0, "differential live model, seed \(seed): see above")
    }

    /// `make soak`: random seeds until QBLOCK_LIVEMODEL_SECONDS have passed; every seed is printed.
    @Test func soak() throws {
        guard let seconds = Self.soakSeconds else { return }
        if let m = Self.missing { print("LiveModelTests soak skipped: \(m)"); return }
        let end = Date().addingTimeInterval(seconds)
        var failed: [Int] = []
        var count = 0
        while Date() < end {
            let seed = Int.random(in: 1..<(1 << 31))
            let r = try Self.runScript("qblock", seed: seed, steps: "20", shrinkSeconds: 120)
            count += 1
            print("live model soak: seed \(seed) \(r.status == 0 ? "pass" : "FAIL")")
            if r.status != 0 { failed.append(seed) }
        }
        print("live model soak: \(count) seeds, failing seeds: \(failed)")
        #expect(failed.isEmpty, "failing seeds: \(failed)")
    }
}
