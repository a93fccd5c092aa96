import Foundation
import QBlock
import Testing
import TestSupport
@testable import QMachine

/// Boots Debian 13's stock riscv64 kernel on `vm` with a busybox initramfs whose test
/// writes a pattern to /dev/vda (dd conv=fsync), drops the page cache, reads it back and
/// prints both checksums; then the host checks the image with qemu-img and qemu-io.
/// The guest comes from scripts/guest/build-guest.sh (downloaded once into .build-guest);
/// without network the tests skip with a message.
@Suite(.serialized) struct BootTests {
    /// The kernel and the initramfs running `test`; nil to skip.
    static func guest(_ test: String = "disk-pattern") throws -> GuestImages? {
        try GuestImages.build("scripts/guest/build-guest.sh",
                              ["--test", "\(GuestImages.repo)/scripts/guest/tests/\(test).sh"], suite: "BootTests")
    }

    /// The optimized tool boots in well under a minute; a debug build is ~10× slower.
    static var timeout: Double { (VMTool.path ?? "").contains("/release/") ? 400 : 1500 }

    static func checksums(_ out: String) -> (pattern: String?, readback: String?) {
        func value(_ key: String) -> String? {
            out.split(whereSeparator: \.isNewline).first { $0.hasPrefix(key) }.map { String($0.dropFirst(key.count)).trimmingCharacters(in: .whitespaces) }
        }
        return (value("guest: pattern md5 "), value("guest: readback md5 "))
    }

    /// Boots with `drive` as /dev/vda and the pattern parameters; checks the guest's side.
    func boot(drive: String, pattern: Int, seekMiB: Int, countMiB: Int) async throws -> VMTool.Result? {
        guard VMTool.path != nil else { Issue.record("vm not built"); return nil }
        guard let g = try Self.guest() else { return nil }
        let r = try await VMTool.run([
            "--machine", "riscv64-virt", "--kernel", g.kernel, "--initrd", g.initrd, "--memory", "512M",
            "--append", "console=ttyS0 cryptomgr.notests PATTERN=\(pattern) SEEK=\(seekMiB) COUNT=\(countMiB)",
            "--drive", drive,
        ], timeout: Self.timeout)
        print("boot: \(String(format: "%.1f", r.seconds)) s, \(r.stdout.split(whereSeparator: \.isNewline).filter { $0.hasPrefix("guest: dd") }.joined(separator: "; "))")
        #expect(r.status == 0 && !r.timedOut, "\(r)")
        #expect(r.stdout.contains("Run /init as init process"), "\(r)")
        #expect(r.stdout.contains("[vda]"), "virtio-blk probed: \(r)")
        let (p, b) = Self.checksums(r.stdout)
        #expect(p != nil && p == b, "pattern and read-back checksums: \(r)")
        #expect(r.stdout.contains("guest: test exit 0"), "\(r)")
        #expect(!r.stdout.contains("Kernel panic"), "\(r)")
        return r
    }

    @Test func rawDiskPatternRoundTrip() async throws {
        let dir = TempDir("boot")
        let disk = dir.file("disk.raw")
        try await ImageCreator.create(format: "raw", path: disk, size: 64 << 20)
        guard try await boot(drive: "file=\(disk),format=raw,id=root", pattern: 0xab, seekMiB: 1, countMiB: 4) != nil else { return }
        guard Tools.qemuAvailable else { print(Tools.qemuMissing); return }
        let io = try run("qemu-io", ["-f", "raw", "-c", "read -P 0xab 1M 4M", "-c", "read -P 0 0 1M", "-c", "read -P 0 5M 1M", disk])
        #expect(io.status == 0 && !io.stdout.contains("Pattern verification failed"), "\(io)")
        #expect(io.stdout.contains("read 4194304/4194304 bytes at offset 1048576"), "\(io)")
    }

    @Test func qcow2OverlayOnABackingFile() async throws {
        guard Tools.qemuAvailable else { print(Tools.qemuMissing); return }
        let dir = TempDir("boot")
        let base = dir.file("base.raw"), top = dir.file("top.qcow2")
        try mustRun("qemu-img", "create", "-f", "raw", base, "64M")
        try mustRun("qemu-io", "-f", "raw", "-c", "write -P 0x11 0 8M", base)
        try mustRun("qemu-img", "create", "-f", "qcow2", "-b", base, "-F", "raw", top)
        guard try await boot(drive: "file=\(top),format=qcow2,id=root", pattern: 0x5a, seekMiB: 4, countMiB: 2) != nil else { return }
        let check = try run("qemu-img", ["check", top])
        #expect(check.status == 0, "\(check)")
        let io = try run("qemu-io", ["-c", "read -P 0x5a 4M 2M", "-c", "read -P 0x11 0 4M", "-c", "read -P 0x11 6M 2M",
                                     "-c", "read -P 0 8M 1M", top])
        #expect(io.status == 0 && !io.stdout.contains("Pattern verification failed"), "\(io)")
        #expect(io.stdout.contains("read 2097152/2097152 bytes at offset 4194304"), "\(io)")
        let b = try run("qemu-io", ["-f", "raw", "-c", "read -P 0x11 4M 2M", base])
        #expect(!b.stdout.contains("Pattern verification failed"), "the backing file is untouched: \(b)")
        let map = try run("qemu-img", ["map", "--output=json", top])
        // Every written byte lives in the overlay (depth 0); the rest comes from the base.
        let entries = (try? JSONSerialization.jsonObject(with: Data(map.stdout.utf8))) as? [[String: Any]] ?? []
        var overlayBytes = 0
        for e in entries {
            guard let start = e["start"] as? Int, let length = e["length"] as? Int, let depth = e["depth"] as? Int else { continue }
            let lo = max(start, 4 << 20), hi = min(start + length, 6 << 20)
            if hi > lo && depth == 0 { overlayBytes += hi - lo }
            if depth == 0 { #expect(start >= 4 << 20 && start + length <= 6 << 20, "only the written range is in the overlay: \(map)") }
        }
        #expect(overlayBytes == 2 << 20, "written clusters live in the overlay: \(map)")
    }

    @Test func consoleInputReachesTheGuest() async throws {
        guard VMTool.path != nil else { Issue.record("vm not built"); return }
        guard let g = try Self.guest("console-echo") else { return }
        let r = try await VMTool.run([
            "--kernel", g.kernel, "--initrd", g.initrd, "--memory", "256M", "--append", "console=ttyS0 cryptomgr.notests",
        ], timeout: Self.timeout, replies: [(after: "guest: type a line", send: "hello from the host\n")])
        #expect(r.status == 0 && !r.timedOut, "\(r)")
        #expect(r.stdout.contains("guest: got <hello from the host>"), "\(r)")
    }

    @Test func twoDrivesReadOnlySerialAndDiscard() async throws {
        guard VMTool.path != nil else { Issue.record("vm not built"); return }
        guard Tools.qemuAvailable else { print(Tools.qemuMissing); return }
        guard let g = try Self.guest("two-drives") else { return }
        let dir = TempDir("boot")
        let a = dir.file("a.qcow2"), b = dir.file("b.raw")
        try mustRun("qemu-img", "create", "-f", "qcow2", a, "32M")
        try mustRun("qemu-io", "-c", "write -P 0x33 0 32M", a)
        try mustRun("qemu-img", "create", "-f", "raw", b, "8M")
        try mustRun("qemu-io", "-f", "raw", "-c", "write -P 0x44 0 1M", b)
        let before = try Data(contentsOf: URL(fileURLWithPath: b))
        let r = try await VMTool.run([
            "--kernel", g.kernel, "--initrd", g.initrd, "--memory", "256M", "--append", "console=ttyS0 cryptomgr.notests",
            "--drive", "file=\(a),format=qcow2,id=system", "--drive", "file=\(b),format=raw,id=data-disk-7,readonly=on",
        ], timeout: Self.timeout)
        #expect(r.status == 0 && !r.timedOut, "\(r)")
        for line in ["guest: vda size=65536 ro=0 serial=system", "guest: vdb size=16384 ro=1 serial=data-disk-7",
                     "guest: vdb write refused", "guest: discard ok", "guest: test exit 0"] {
            #expect(r.stdout.contains(line), "\(line): \(r)")
        }
        // The guest read the host's pattern from the read-only disk, which is unchanged.
        let md5 = try run("/bin/sh", ["-c", "head -c 1048576 '\(b)' | md5sum | cut -d' ' -f1"]).stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(r.stdout.contains("guest: vdb md5 \(md5)"), "\(r)")
        #expect(try Data(contentsOf: URL(fileURLWithPath: b)) == before)
        // blkdiscard of the whole qcow2 disk: clean image that reads as zeros.
        #expect(try run("qemu-img", ["check", a]).status == 0)
        let io = try run("qemu-io", ["-c", "read -P 0 0 32M", a])
        #expect(!io.stdout.contains("Pattern verification failed"), "\(io)")
    }

    @Test func diskServedOverNBD() async throws {
        guard let nbd = Tools.executable("nbd") else { Issue.record("nbd not built"); return }
        guard Tools.qemuAvailable else { print(Tools.qemuMissing); return }
        let dir = TempDir("boot")
        let image = dir.file("served.qcow2"), sock = dir.file("nbd.sock")
        try mustRun("qemu-img", "create", "-f", "qcow2", image, "64M")
        let server = Process()
        server.executableURL = URL(fileURLWithPath: nbd)
        server.arguments = ["-k", sock, "-f", "qcow2", image]
        server.standardOutput = FileHandle.nullDevice
        server.standardError = FileHandle.nullDevice
        try server.run()
        defer { if server.isRunning { server.terminate() }; server.waitUntilExit() }
        let start = ContinuousClock.now
        while !FileManager.default.fileExists(atPath: sock) && ContinuousClock.now - start < .seconds(10) {
            try await Task.sleep(for: .milliseconds(20))
        }
        guard try await boot(drive: "file=nbd+unix:///?socket=\(sock),format=raw", pattern: 0x4d, seekMiB: 3, countMiB: 4) != nil else { return }
        while server.isRunning && ContinuousClock.now - start < .seconds(30) { try await Task.sleep(for: .milliseconds(20)) }
        #expect(try run("qemu-img", ["check", image]).status == 0)
        let io = try run("qemu-io", ["-c", "read -P 0x4d 3M 4M", "-c", "read -P 0 0 3M", image])
        #expect(io.status == 0 && !io.stdout.contains("Pattern verification failed"), "\(io)")
    }
}
