import Foundation
import Testing
import TestSupport

/// Live block operations on a running guest, end to end: `vm --qmp` boots Debian's riscv64
/// kernel with the lvwriter initramfs (guests/riscv-writer), whose writer appends numbered,
/// checksummed blocks to /dev/vda and verifies what it reads back, while
/// Tests/Scripts/python/livevm/livevm.py drives the monitor with QEMU's `qemu.qmp` client. One boot
/// covers several operations. The guest must report no verification failure and power off;
/// every final qcow2 image must pass `qemu-img check` and hold exactly the blocks the guest
/// acknowledged; copies taken while the guest runs (a stopped guest's external convert, a
/// background mirror cancelled after READY) must be consistent prefixes.
/// Skipped with a message when the guest cannot be downloaded, or qemu.qmp / QEMU's tools
/// are missing.
@Suite(.serialized) struct LiveVMTests {
    static let repo = GuestImages.repo

    /// The kernel and the lvwriter initramfs; nil to skip.
    static func guest() throws -> GuestImages? {
        try GuestImages.build("guests/riscv-writer/make-guest.sh", suite: "LiveVMTests")
    }

    /// Runs livevm.py with `steps`; nil when skipped.
    func scenario(_ steps: [String], timeout: Int = 1200) throws -> RunResult? {
        guard let vm = VMTool.path else { Issue.record("vm not built"); return nil }
        guard Tools.qemuAvailable, Tools.which("qemu-nbd") != nil else { print("LiveVMTests skipped: \(Tools.qemuMissing)"); return nil }
        guard let python = Tools.which("python3") else { print("LiveVMTests skipped: python3 missing"); return nil }
        guard let g = try Self.guest() else { return nil }
        let dir = TempDir("livevm")
        let r = try run("/usr/bin/timeout", ["--signal=KILL", String(timeout), python, "\(Self.repo)/Tests/Scripts/python/livevm/livevm.py",
                                             "--vm", vm, "--kernel", g.kernel, "--initrd", g.initrd,
                                             "--workdir", dir.path, "--steps", steps.joined(separator: ",")])
        if r.status == 77 {
            print("LiveVMTests skipped: \(r.stdout.trimmingCharacters(in: .whitespacesAndNewlines))")
            return nil
        }
        for line in r.stdout.split(separator: "\n") where line.hasPrefix("livevm: ") { print(line) }
        if r.status != 0 {
            let console = (try? String(contentsOfFile: dir.file("console.log"), encoding: .utf8)) ?? ""
            Issue.record("livevm.py failed: \(r)\nconsole (last 4000 bytes):\n\(console.suffix(4000))")
        }
        return r
    }

    /// A live snapshot to a qcow2 overlay, then `stop`, an external `qemu-img convert -U`
    /// of the stopped guest's disk (a consistent copy), `cont`; a stream of the overlay;
    /// a write-blocking mirror to an NBD target served by qemu-nbd with pivot; a background
    /// mirror to a qcow2 file cancelled after READY — all on one boot while the guest writes.
    @Test func liveOperationsOnAWritingGuest() async throws {
        guard let r = try scenario(["snapshot", "stopcont", "stream", "mirror-nbd", "mirror-bg"]) else { return }
        #expect(r.stdout.contains("livevm: PASS"), "\(r)")
    }

    /// The machine commands on a kernel that only loops (no guest download needed):
    /// query-status, query-named-block-nodes, stop/cont with their events once each,
    /// system_powerdown, and the three ways to end: quit, system_reset, SIGTERM.
    @Test(arguments: ["quit", "reset", "signal"])
    func machineCommands(_ which: String) throws {
        guard let vm = VMTool.path else { Issue.record("vm not built"); return }
        guard let python = Tools.which("python3") else { print("LiveVMTests skipped: python3 missing"); return }
        let dir = TempDir("livevm-ctl")
        let kernel = dir.file("loop.Image")
        #expect(FileManager.default.createFile(atPath: kernel, contents: Data(TinyKernel.image([0x0000_006f]))))   // j .
        let r = try run("/usr/bin/timeout", ["--signal=KILL", "180", python, "\(Self.repo)/Tests/Scripts/python/livevm/control.py",
                                             "--vm", vm, "--kernel", kernel, "--workdir", dir.path, "--case", which])
        if r.status == 77 { print("LiveVMTests skipped: \(r.stdout)"); return }
        #expect(r.status == 0 && r.stdout.contains("control: PASS"), "\(r)")
    }
}
