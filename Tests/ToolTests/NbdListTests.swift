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

    @Test(.enabled(if: haveQemuNBD, "needs qemu-nbd and qemu-img"))
    func toolListAndOffsetMatchQemuNBD() throws {
        let dir = TempDir()
        let image = dir.file("a.raw")
        try mustRun("qemu-img", "create", "-q", "-f", "raw", image, "1M")
        try mustRun("qemu-io", "-f", "raw", "-c", "write -q -P 7 0 4k", "-c", "write -q -P 9 4k 4k", image)
        let nbd = try #require(Tools.executable("nbd"))
        // --offset 4096 --list against each server: the same report, the same bytes at 0.
        for server in ["qemu-nbd", "nbd"] {
            let s = try NBDHarness.start(server, ["-r", "-f", "raw", "--offset", "4096", "-x", "e"], image: image, dir: dir, tag: "off-\(server)")
            defer { s.stop() }
            let theirs = try run("qemu-nbd", "-L", "-k", s.socket)
            let ours = try run(nbd, ["-L", "-k", s.socket])
            #expect(ours.status == 0 && ours.stdout == theirs.stdout, "\(server): \(ours) vs \(theirs)")
            let r = try run("qemu-io", "-r", "-f", "raw", "-c", "read -q -P 9 0 4k", "-c", "length", s.uri("e"))
            #expect(r.status == 0 && r.stdout == "1020 KiB\n", "\(server): \(r)")
        }
        let bad = try run(nbd, ["-L", "-k", dir.file("x.sock"), image])
        let ref = try run("qemu-nbd", "-L", "-k", dir.file("x.sock"), image)
        #expect(bad.status == ref.status && bad.stderr.replacingOccurrences(of: "nbd: ", with: "qemu-nbd: ") == ref.stderr)
    }
}
