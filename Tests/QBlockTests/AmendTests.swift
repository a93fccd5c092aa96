import Foundation
import Testing
import TestSupport

@Suite struct AmendTests {
    /// v2 ⇄ v3 with data and zero clusters, with and without a backing file.
    @Test(qemuTrait, arguments: [false, true])
    func upAndDownKeepContent(backed: Bool) throws {
        let d = TempDir()
        try mustRun("qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", d.file("b.qcow2"), "1M")
        try mustRun("qemu-io", "-c", "write -P 5 0 1M", d.file("b.qcow2"))
        if backed {
            try mustRun("qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", "-b", "b.qcow2", "-F", "qcow2", d.file("x.qcow2"))
        } else {
            try mustRun("qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", d.file("x.qcow2"), "1M")
        }
        try mustRun("qemu-io", "-c", "write -P 6 0 64k", d.file("x.qcow2"))
        var r = try run("img", "amend", "-o", "compat=1.1,lazy_refcounts=on", d.file("x.qcow2"))
        #expect(r.status == 0, "\(r)")
        var info = try ChainFixture.info(d.file("x.qcow2"))
        #expect(info.contains("compat: 1.1") && info.contains("lazy refcounts: true"))
        #expect(try ChainFixture.clean(d.file("x.qcow2")))
        try mustRun("qemu-io", "-c", "write -z 64k 64k", "-c", "write -z 256k 4k", "-c", "write -P 8 512k 64k", "-c", "write -z 512k 64k",
                    d.file("x.qcow2"))
        try mustRun("qemu-img", "convert", "-O", "raw", d.file("x.qcow2"), d.file("expect.raw"))
        r = try run("img", "amend", "-o", "compat=0.10", d.file("x.qcow2"))
        #expect(r.status == 0, "\(r)")
        info = try ChainFixture.info(d.file("x.qcow2"))
        #expect(info.contains("compat: 0.10"))
        #expect(try ChainFixture.clean(d.file("x.qcow2")))
        #expect(try ChainFixture.identical(d.file("x.qcow2"), d.file("expect.raw")))
    }

    static let errorCases: [[String]] = [
        ["-o", "compat=0.10,lazy_refcounts=on"], ["-o", "compat=0.9"], ["-o", "foo=bar"], ["-o", "lazy_refcounts=xx"],
        ["-o", "cluster_size=4k"], ["-o", "backing_file=x"], ["-f", "raw", "-o", "compat=1.1"], ["-o", "compat=0.10,refcount_bits=8"],
    ]

    @Test(qemuTrait, arguments: errorCases)
    func refusedAmendChangesNothing(args: [String]) throws {
        let d = TempDir()
        try mustRun("qemu-img", "create", "-q", "-f", "qcow2", d.file("v.qcow2"), "1M")
        let before = try ChainFixture.snapshot(d)
        let ours = try run("img", ["amend"] + args + ["v.qcow2"], cwd: d.path)
        #expect(try ChainFixture.snapshot(d) == before)
        let theirs = try run("qemu-img", ["amend"] + args + ["v.qcow2"], cwd: d.path)
        #expect(ours.status == theirs.status)
        #expect(ours.stderr == asImg(theirs.stderr))
    }
}
