import Foundation
import Testing
import TestSupport

/// The x86_64-micro guests run by the `vm` tool:
/// `vm --machine x86_64-micro --accel kvm --firmware FILE --drive file=…,format=qcow2`.
@Suite(.serialized) struct KVMVMToolTests {
    static let vmMissing = "the vm tool is not built (swift build); vm test skipped"

    @Test(kvmGuestTrait, .enabled(if: Tools.qemuAvailable, Comment(rawValue: Tools.qemuMissing)),
          .enabled(if: Tools.executable("vm") != nil, Comment(rawValue: vmMissing)))
    func virtioBlockGuestThroughTheVMTool() throws {
        let dir = TempDir("kvm-vm")
        let disk = try KVMVirtioBlockTests.makeImage(in: dir)
        let bin = try KVMGuestKit.build("virtio-blk-test", in: dir)
        let start = ContinuousClock.now
        let r = try run(Tools.executable("vm")!, ["--machine", "x86_64-micro", "--accel", "kvm", "--firmware", bin,
                                                  "--drive", "file=\(disk),format=qcow2"])
        print("vm --accel kvm virtio-blk guest: exit \(r.status) after \(ContinuousClock.now - start)")
        #expect(r.status == 0, "\(r)")
        KVMVirtioBlockTests.checkOutput(r.stdout)
        try KVMVirtioBlockTests.verifyImage(disk)
    }

    @Test(kvmGuestTrait, .enabled(if: Tools.executable("vm") != nil, Comment(rawValue: vmMissing)))
    func tripleFaultThroughTheVMToolIsAnError() throws {
        let dir = TempDir("kvm-vm")
        let bin = try KVMGuestKit.build("triple-fault", in: dir)
        let r = try run(Tools.executable("vm")!, ["--machine", "x86_64-micro", "--accel", "kvm", "--firmware", bin])
        #expect(r.status != 0, "\(r)")
        #expect(r.stdout == "about to fault\n", "\(r)")
        #expect(r.stderr.contains("triple fault"), "\(r)")
    }
}
