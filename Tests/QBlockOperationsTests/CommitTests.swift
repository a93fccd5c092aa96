import Foundation
import Testing
import TestSupport

@Suite struct CommitTests {
    @Test(qemuTrait)
    func commitIntoBackingEmptiesTop() throws {
        let d = TempDir()
        try ChainFixture.chain(d)
        let r = try run("img", "commit", "top.qcow2", cwd: d.path)
        #expect(r.status == 0 && r.stdout == "Image committed.\n", "\(r)")
        #expect(try ChainFixture.identical(d.file("mid.qcow2"), d.file("expect.raw")))
        #expect(try ChainFixture.identical(d.file("top.qcow2"), d.file("expect.raw")))
        #expect(try ChainFixture.clean(d.file("mid.qcow2")))
        #expect(try ChainFixture.clean(d.file("top.qcow2")))
        let map = try mustRun("qemu-img", "map", "--output=json", d.file("top.qcow2")).stdout
        #expect(!map.contains("\"depth\": 0"), "\(map)")
        #expect(try ChainFixture.info(d.file("mid.qcow2")).contains("virtual size: 2 MiB"))
    }

    @Test(qemuTrait)
    func commitIntoNamedBaseKeepsTop() throws {
        let d = TempDir()
        try ChainFixture.chain(d)
        try mustRun("qemu-img", "convert", "-O", "raw", d.file("mid.qcow2"), d.file("mid.raw"))
        let r = try run("img", "commit", "-q", "-b", "base.qcow2", "top.qcow2", cwd: d.path)
        #expect(r.status == 0 && r.stdout.isEmpty, "\(r)")
        #expect(try ChainFixture.identical(d.file("base.qcow2"), d.file("expect.raw")))
        #expect(try ChainFixture.identical(d.file("top.qcow2"), d.file("expect.raw")))
        #expect(try ChainFixture.clean(d.file("base.qcow2")))
        let map = try mustRun("qemu-img", "map", "--output=json", d.file("top.qcow2")).stdout
        #expect(map.contains("\"depth\": 0, \"present\": true"))
    }

    @Test(qemuTrait)
    func commitKeepingTop() throws {
        let d = TempDir()
        try ChainFixture.chain(d)
        let r = try run("img", "commit", "-d", "top.qcow2", cwd: d.path)
        #expect(r.status == 0, "\(r)")
        #expect(try ChainFixture.identical(d.file("mid.qcow2"), d.file("expect.raw")))
        let map = try mustRun("qemu-img", "map", "--output=json", d.file("top.qcow2")).stdout
        #expect(map.contains("\"depth\": 0, \"present\": true"))
    }

    static let errorCases: [[String]] = [
        ["base.qcow2"], ["-b", "nope", "top.qcow2"], ["-b", "top.qcow2", "top.qcow2"], ["nope"], ["-t", "foo", "top.qcow2"],
    ]

    @Test(qemuTrait, arguments: errorCases)
    func refusedCommitChangesNothing(args: [String]) throws {
        let d = TempDir()
        try ChainFixture.chain(d)
        let before = try ChainFixture.snapshot(d)
        let ours = try run("img", ["commit"] + args, cwd: d.path)
        #expect(try ChainFixture.snapshot(d) == before)
        let theirs = try run("qemu-img", ["commit"] + args, cwd: d.path)
        #expect(ours.status == theirs.status)
        #expect(ours.stderr == asImg(theirs.stderr))
    }
}
