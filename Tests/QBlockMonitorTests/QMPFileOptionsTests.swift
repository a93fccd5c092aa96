import Foundation
import Testing
import TestSupport

/// Options QEMU's `file` driver and `nbd-server-start` take that change what happens —
/// `locking`, `pr-manager`, `auto-read-only`, `tls-creds` — replayed on `nbd --qmp` and on
/// qemu-storage-daemon 7.2, every reply line compared. None may be accepted and ignored.
@Suite(.serialized)
struct QMPFileOptionsTests {
    @Test("locking=off takes no lock, pr-manager and tls-creds name objects that cannot exist, as qemu-storage-daemon")
    func lockingPrManagerAndTLSMatchQemu() throws {
        let setup: (TempDir) throws -> Void = { dir in
            try mustRun("qemu-img", "create", "-q", "-f", "qcow2", dir.file("b.qcow2"), "1M")
            try mustRun("qemu-img", "create", "-q", "-f", "qcow2", dir.file("c.qcow2"), "1M")
        }
        guard let (ours, _) = try QMPSurface2Tests.compareWithQemu("transcript-file-options.jsonl", setup: setup) else { return }
        // Not vacuous: the read-only node on a locked image opened only with locking=off, and no
        // server listened on the sockets of the refused TLS starts.
        let lines = try QMPHarness.transcript(daemon: [Tools.executable("nbd") ?? "nbd", "--qmp", "$SOCK"],
                                              script: "transcript-file-options.jsonl", setup: setup).split(separator: "\n")
        #expect(lines.filter { $0.contains("Failed to get shared \\\"write\\\" lock") }.count == 2, "\(lines)")
        #expect(lines.contains { $0.contains("No TLS credentials with id 'tls0'") })
        #expect(!FileManager.default.fileExists(atPath: ours.file("n1.sock")))
    }

    /// chattr +i makes the file unwritable even for root; skipped where chattr is refused.
    static func immutable(_ path: String, _ on: Bool) -> Bool {
        (try? run("chattr", [on ? "+i" : "-i", path]).status) == 0
    }

    @Test("auto-read-only opens a file the process may only read, read-only; a writer above it still fails")
    func autoReadOnlyMatchesQemu() throws {
        var made: [String] = []
        defer { for p in made { _ = Self.immutable(p, false) } }
        var supported = true
        let setup: (TempDir) throws -> Void = { dir in
            try mustRun("qemu-img", "create", "-q", "-f", "qcow2", dir.file("a.qcow2"), "1M")
            if Self.immutable(dir.file("a.qcow2"), true) { made.append(dir.file("a.qcow2")) } else { supported = false }
        }
        let ourDir = TempDir("auto-ro-ours")
        let ours = try QMPHarness.transcript(daemon: [Tools.executable("nbd") ?? "nbd", "--qmp", "$SOCK"],
                                             script: "transcript-auto-read-only.jsonl", dir: ourDir, setup: setup)
        guard supported else {
            print("QMPFileOptionsTests: chattr +i is not permitted here; auto-read-only not tested")
            return
        }
        let lines = ours.split(separator: "\n")
        #expect(lines.count == 6 && lines[1].contains("Operation not permitted") && lines[2] == #"{"return": {}}"#
                && lines[3] == #"{"return": {}}"# && lines[4].contains("Block node is read-only"), "\(ours)")
        if QMPSurface2Tests.haveQSD {
            let qemu = try QMPHarness.transcript(daemon: [Tools.which("qemu-storage-daemon") ?? "qemu-storage-daemon",
                                                          "--chardev", "socket,path=$SOCK,server=on,wait=off,id=m0", "--monitor", "chardev=m0"],
                                                 script: "transcript-auto-read-only.jsonl", dir: TempDir("auto-ro-qemu"), setup: setup)
            // The writer's error is worded differently (QEMU tries to reopen the file
            // read-write and reports why that failed); the rest is the same.
            var a = lines, b = qemu.split(separator: "\n")
            #expect(a.count == b.count && b.count > 4 && b[4].contains("GenericError"), "\(qemu)")
            if a.count == b.count && a.count > 4 { a.remove(at: 4); b.remove(at: 4) }
            #expect(a == b)
        }
    }

    @Test("two parents of one node must not conflict: a second qcow2 node on a file another writes is refused, as qemu-storage-daemon")
    func permissionConflictsMatchQemu() throws {
        let setup: (TempDir) throws -> Void = { dir in
            try mustRun("qemu-img", "create", "-q", "-f", "qcow2", dir.file("a.qcow2"), "1M")
        }
        guard let (ours, _) = try QMPSurface2Tests.compareWithQemu("transcript-permissions.jsonl", setup: setup) else { return }
        // The nodes that were refused or deleted left the file node open and the image clean.
        let check = try run("qemu-img", ["check", ours.file("a.qcow2")])
        #expect(check.status == 0, "\(check)")
    }

    @Test("an NBD export is a user of its node: a writable export of a file a qcow2 node uses is refused, and the reverse, as qemu-storage-daemon")
    func exportPermissionConflictsMatchQemu() throws {
        let setup: (TempDir) throws -> Void = { dir in
            try mustRun("qemu-img", "create", "-q", "-f", "qcow2", dir.file("a.qcow2"), "1M")
        }
        guard let (ours, _) = try QMPSurface2Tests.compareWithQemu("transcript-permissions-exports.jsonl", setup: setup) else { return }
        let check = try run("qemu-img", ["check", ours.file("a.qcow2")])
        #expect(check.status == 0, "\(check)")
    }
}
