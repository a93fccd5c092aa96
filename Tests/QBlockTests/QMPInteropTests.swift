import Foundation
import Testing
@testable import QBlock
import TestSupport

/// The same QMP script replayed on `nbd --qmp` and on qemu-storage-daemon 7.2: every reply
/// (successes, errors, `query-named-block-nodes` after a live snapshot, the overlay going
/// away with its export) must be byte for byte the same.
@Suite(.serialized, .enabled(if: QMPHarness.ready && Tools.which("qemu-storage-daemon") != nil,
                             Comment(rawValue: "needs qemu-storage-daemon, python3 and the built nbd tool; skipped")))
struct QMPInteropTests {
    private func transcript(daemon: [String], script: String) throws -> String {
        let dir = TempDir("qmp-transcript")
        try mustRun("qemu-img", "create", "-q", "-f", "qcow2", dir.file("base.qcow2"), "16M")
        try mustRun("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", dir.file("top.qcow2"))
        try mustRun("qemu-io", "-c", "write 0 64k", dir.file("top.qcow2"))
        try truncateFile(dir.file("r.raw"), to: 8 << 20)
        let socket = dir.file("qmp.sock")
        guard let pid = NBDHarness.spawn(daemon.map { $0.replacingOccurrences(of: "$SOCK", with: socket) }, output: dir.file("log")) else {
            throw QMPTestError(description: "cannot start \(daemon[0])")
        }
        defer { kill(pid, SIGTERM); _ = NBDHarness.reap(pid) }
        let deadline = Date().addingTimeInterval(10)
        while !FileManager.default.fileExists(atPath: socket) && Date() < deadline { usleep(10_000) }
        usleep(50_000)
        let r = try run(Tools.which("python3") ?? "python3", ["\(QMPHarness.pythonDir)/qmp_transcript.py", socket,
                                                              "\(QMPHarness.pythonDir)/\(script)", dir.path])
        guard r.status == 0 else { throw QMPTestError(description: "transcript failed: \(r)") }
        return r.stdout.replacingOccurrences(of: dir.path, with: "$DIR")
    }

    @Test func blockCommandsMatchQemuStorageDaemon() throws {
        let ours = try transcript(daemon: [Tools.executable("nbd") ?? "nbd", "--qmp", "$SOCK"], script: "transcript-block.jsonl")
        let qemu = try transcript(daemon: [Tools.which("qemu-storage-daemon") ?? "qemu-storage-daemon",
                                           "--chardev", "socket,path=$SOCK,server=on,wait=off,id=m0", "--monitor", "chardev=m0"],
                                  script: "transcript-block.jsonl")
        let a = ours.split(separator: "\n"), b = qemu.split(separator: "\n")
        #expect(a.count == b.count)
        for (i, (x, y)) in zip(a, b).enumerated() {
            #expect(x == y, "reply \(i + 1) differs:\nours: \(x)\nqemu: \(y)")
        }
    }
}
