import Foundation
import Testing
import QBlock
import TestSupport
import ToolSupport

/// `qemu-nbd --list`'s report, built from ``NBDExportList`` and ``NbdListOutput``: the same
/// bytes qemu-nbd prints for the same server, against qemu-nbd's server and ours.
@Suite struct NbdListTests {
    static let haveQemuNBD = Tools.which("qemu-nbd") != nil && Tools.which("qemu-img") != nil

    @Test(.enabled(if: haveQemuNBD, "needs qemu-nbd and qemu-img"),
          arguments: [("qemu-nbd", ["-r", "-A", "-x", "exp", "-D", "a disk"]), ("qemu-nbd", ["-B", "b0", "-x", ""]),
                      ("nbd", ["-r", "-A", "-x", "exp", "-D", "a disk"]), ("nbd", ["-B", "b0"])])
    func listMatchesQemuNBD(server: String, args: [String]) async throws {
        let dir = TempDir()
        let image = dir.file("a.qcow2")
        try mustRun("qemu-img", "create", "-q", "-f", "qcow2", image, "4M")
        try mustRun("qemu-img", "bitmap", "--add", image, "b0")
        let s = try NBDHarness.start(server, ["-f", "qcow2"] + args, image: image, dir: dir, tag: "list")
        defer { s.stop() }
        let theirs = try run("qemu-nbd", "-L", "-k", s.socket)
        #expect(theirs.status == 0, "\(theirs)")
        let ours = NbdListOutput.render(try await NBDExportList.list(try NBDURI(s.uri)))
        #expect(ours == theirs.stdout)
    }
}
