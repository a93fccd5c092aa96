import Foundation
import Testing
import TestSupport

@Suite struct ShrinkTests {
    @Test(qemuTrait, arguments: ["64k", "2M"])
    func shrinkKeepsHeadAndFreesTail(clusterSize: String) throws {
        let d = TempDir()
        let img = d.file("s.qcow2")
        try mustRun("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=\(clusterSize)", img, "8M")
        try mustRun("qemu-io", "-c", "write -P 1 0 1M", "-c", "write -P 2 3M 1M", "-c", "write -P 3 7M 1M", img)
        try mustRun("qemu-img", "convert", "-O", "raw", img, d.file("expect.raw"))
        try truncateFile(d.file("expect.raw"), to: 3 << 20 + 512 * 3)
        let before = try FileManager.default.attributesOfItem(atPath: img)[.size] as? Int ?? 0
        var r = try run("img", "resize", img, "--", "-3M")
        #expect(r.status == 1 && r.stderr.contains("Use the --shrink option"))
        r = try run("img", "resize", "--shrink", img, String(3 << 20 + 512 * 3))
        #expect(r.status == 0, "\(r)")
        #expect(try ChainFixture.info(img).contains("virtual size: 3 MiB (3147264 bytes)"))
        #expect(try ChainFixture.clean(img))
        #expect(try ChainFixture.identical(img, d.file("expect.raw")))
        let after = try FileManager.default.attributesOfItem(atPath: img)[.size] as? Int ?? 0
        #expect(after < before)
        // Growing again shows zeros from the first cluster past the new end (the rest of the
        // last kept cluster keeps its old bytes, as with QEMU).
        r = try run("img", "resize", img, "8M")
        #expect(r.status == 0)
        let cs = clusterSize == "64k" ? 65536 : 2 << 20
        let from = (3147264 + cs - 1) / cs * cs
        let read = try run("qemu-io", "-c", "read -P 0 \(from) \((8 << 20) - from)", img)
        #expect(read.status == 0 && !read.stdout.contains("Pattern verification failed"), "\(read)")
    }
}
