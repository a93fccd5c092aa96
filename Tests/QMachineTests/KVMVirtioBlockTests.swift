import Foundation
import Testing
import TestSupport
import QBlock
@testable import QMachine

/// The virtio-blk guest program (`guests/x86-micro/virtio-blk-test.S`) run on KVM against
/// a qcow2 image, checked byte for byte on the host with QEMU's tools.
@Suite(.serialized) struct KVMVirtioBlockTests {
    /// Sector 0 as the test writes it: 256 bytes of 0x42, then 256 of 0x17.
    static let sector0: [UInt8] = Array(repeating: 0x42, count: 256) + Array(repeating: 0x17, count: 256)

    /// FNV-1a 32, as the guest computes it.
    static func fnv1a(_ bytes: [UInt8]) -> UInt32 {
        var h: UInt32 = 0x811c_9dc5
        for b in bytes { h = (h ^ UInt32(b)) &* 0x0100_0193 }
        return h
    }

    static var expectedSum: String {
        let s = String(fnv1a(sector0), radix: 16)
        return "sector 0 fnv1a " + String(repeating: "0", count: 8 - s.count) + s
    }

    /// A 1 MiB qcow2 image: sector 0 as above, sectors 1..8 filled with 0x33 (so the
    /// guest's writes must replace something), the rest unallocated.
    static func makeImage(in dir: TempDir) throws -> String {
        let disk = dir.file("disk.qcow2")
        try mustRun("qemu-img", "create", "-q", "-f", "qcow2", disk, "1M")
        try mustRun("qemu-io", "-f", "qcow2", "-c", "write -P 0x42 0 256", "-c", "write -P 0x17 256 256",
                    "-c", "write -P 0x33 512 4096", disk)
        return disk
    }

    /// What the guest left on the image, checked with qemu-img check and qemu-io read -P.
    static func verifyImage(_ disk: String) throws {
        let check = try run("qemu-img", ["check", disk])
        #expect(check.status == 0, "\(check)")
        var args = ["-f", "qcow2", "-c", "read -P 0x42 0 256", "-c", "read -P 0x17 256 256"]
        for k in 1...8 { args += ["-c", "read -P 0x\(String(0xa0 + k, radix: 16)) \(512 * k) 512"] }
        args += ["-c", "read -P 0 4608 512"]   // sector 9: never written
        args.append(disk)
        let r = try run("qemu-io", args)
        #expect(r.status == 0, "\(r)")
        #expect(!r.stdout.contains("Pattern verification failed"), "\(r.stdout)")
        #expect(r.stdout.components(separatedBy: "read ").count - 1 == 11, "\(r.stdout)")
    }

    static func checkOutput(_ output: String) {
        #expect(output.hasPrefix("x86_64-micro virtio-blk test\nvirtio-blk at 0xd0000000\ncapacity 0x00000800 sectors\n"), "\(output)")
        #expect(output.contains(expectedSum + "\n"), "expected '\(expectedSum)' in: \(output)")
        #expect(output.hasSuffix("wrote sectors 1-8, flushed, read back: OK\n"), "\(output)")
        #expect(!output.contains("FAIL"), "\(output)")
    }

    @Test(kvmGuestTrait, .enabled(if: Tools.qemuAvailable, Comment(rawValue: Tools.qemuMissing)))
    func guestProgramThroughTheMachine() async throws {
        let dir = TempDir("kvm-blk")
        let disk = try Self.makeImage(in: dir)
        let bin = try KVMGuestKit.build("virtio-blk-test", in: dir)
        let node = try await DriveSpec(file: disk, format: "qcow2").open()
        let serial = BufferSerialBackend()
        var config = KVMGuestKit.configuration(bin, serial: serial)
        config.drives = [.init(node: node, id: "disk0")]
        let machine = try X86MicroMachine(config)
        let start = ContinuousClock.now
        let exit = await machine.run(timeout: 120)
        let elapsed = ContinuousClock.now - start
        try await machine.quiesce()
        try await node.close()
        print("virtio-blk guest on KVM: \(exit) after \(elapsed), \(machine.vcpus[0].exitCount) exits")
        #expect(exit == .shutdown, "output: \(serial.text)")
        Self.checkOutput(serial.text)
        try Self.verifyImage(disk)
    }

    @Test(kvmGuestTrait)
    func noDriveIsReportedByTheGuest() async throws {
        let dir = TempDir("kvm-blk")
        let bin = try KVMGuestKit.build("virtio-blk-test", in: dir)
        let serial = BufferSerialBackend()
        let machine = try X86MicroMachine(KVMGuestKit.configuration(bin, serial: serial))
        let exit = await machine.run(timeout: 60)
        #expect(exit == .shutdown)
        #expect(serial.text.hasSuffix("FAIL no virtio-blk device\n"), "\(serial.text)")
    }
}
