import Foundation
import Glibc
import Testing
import TestSupport
@testable import QBlock

/// The job commands driven over QMP by the Python `qemu.qmp` client against `nbd --qmp`:
/// tests/python/jobs/mirror_run.py (drive-mirror with an NBD writer, every sync and copy
/// mode, complete and cancel) and jobs_qmp.py (stream, active commit, verbs, errors).
@Suite(.serialized) struct JobQMPTests {
    static let pythonDir: String = {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent("tests/python/jobs").path
    }()

    static var ready: Bool {
        guard Tools.qemuAvailable, Tools.executable("nbd") != nil else { return false }
        return (try? run("python3", "-c", "import qemu.qmp").status) == 0
    }

    /// Starts `nbd --qmp` on a socket in `d`; returns the process.
    static func daemon(_ d: TempDir) throws -> (Process, String) {
        let sock = d.file("qmp.sock")
        let p = Process()
        p.executableURL = URL(fileURLWithPath: Tools.executable("nbd")!)
        p.arguments = ["--qmp", sock]
        p.standardOutput = FileHandle.nullDevice
        try p.run()
        for _ in 0..<300 where !FileManager.default.fileExists(atPath: sock) { usleep(10_000) }
        return (p, sock)
    }

    @Test(arguments: [("full", "background", false), ("full", "write-blocking", false), ("full", "background", true),
                      ("top", "write-blocking", false), ("none", "background", false)])
    func driveMirrorWithAnNBDWriter(sync: String, copyMode: String, cancel: Bool) async throws {
        guard Self.ready else { print("qemu tools, nbd or python qemu.qmp missing: QMP job test skipped"); return }
        let d = TempDir("qmp-mirror")
        try mustRun("qemu-img", "create", "-q", "-f", "qcow2", d.file("src.qcow2"), "32M")
        try mustRun("qemu-io", "-c", "write -P 0x31 0 8M", "-c", "write -P 0x32 20M 4M", d.file("src.qcow2"))
        let (p, sock) = try Self.daemon(d)
        defer { if p.isRunning { p.terminate() }; p.waitUntilExit() }
        var args = ["\(Self.pythonDir)/mirror_run.py", sock, d.path, "--sync", sync, "--copy-mode", copyMode, "--writes", "300"]
        if cancel { args.append("--cancel") }
        let r = try run("python3", args)
        #expect(r.status == 0, "\(r)")
        p.waitUntilExit()
        #expect(r.stdout.contains("BLOCK_JOB_READY"))
        // sync=none/top targets only hold what was written (their backing is the source's, none here).
        if sync == "full" {
            #expect(try run("qemu-img", "compare", "-q", d.file("ref.qcow2"), d.file("tgt.qcow2")).status == 0)
        }
        #expect(try JobFixture.check(d.file("tgt.qcow2")))
        #expect(try JobFixture.check(d.file("src.qcow2")))
    }

    @Test func streamCommitAndVerbs() async throws {
        guard Self.ready else { print("qemu tools, nbd or python qemu.qmp missing: QMP job test skipped"); return }
        let d = TempDir("qmp-jobs")
        let (_, _, top) = try JobFixture.chain(d)
        let expected = try JobFixture.content(top)
        let (p, sock) = try Self.daemon(d)
        defer { if p.isRunning { p.terminate() }; p.waitUntilExit() }
        let r = try run("python3", ["\(Self.pythonDir)/jobs_qmp.py", sock, d.path])
        #expect(r.status == 0, "\(r)")
        p.waitUntilExit()
        #expect(try JobFixture.check(top))
        #expect(try JobFixture.backing(top) == d.file("base.raw"))
        // After the active commit the base holds what the top showed.
        #expect(try JobFixture.same(d.file("base.raw"), expected))
    }
}
