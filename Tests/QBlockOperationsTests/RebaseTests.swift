import Foundation
import Testing
import TestSupport

@Suite struct RebaseTests {
    @Test(qemuTrait, arguments: [["-F", "qcow2", "-b", "nb.qcow2"], ["-b", ""], ["-F", "qcow2", "-b", "base.qcow2"]])
    func safeRebaseKeepsContent(args: [String]) throws {
        let d = TempDir()
        try ChainFixture.chain(d)
        let r = try run("img", ["rebase"] + args + ["top.qcow2"], cwd: d.path)
        #expect(r.status == 0, "\(r)")
        #expect(try ChainFixture.identical(d.file("top.qcow2"), d.file("expect.raw")))
        #expect(try ChainFixture.clean(d.file("top.qcow2")))
        let info = try ChainFixture.info(d.file("top.qcow2"))
        let name = args[args.firstIndex(of: "-b")! + 1]
        if name.isEmpty {
            #expect(!info.contains("backing file"))
        } else {
            #expect(info.contains("backing file: \(name)"))
            #expect(info.contains("backing file format: qcow2\n"))
        }
    }

    @Test(qemuTrait)
    func unsafeRebaseOnlyChangesHeader() throws {
        let d = TempDir()
        try ChainFixture.chain(d)
        let r = try run("img", "rebase", "-u", "-F", "qcow2", "-b", "nb.qcow2", "top.qcow2", cwd: d.path)
        #expect(r.status == 0, "\(r)")
        let info = try ChainFixture.info(d.file("top.qcow2"))
        #expect(info.contains("backing file: nb.qcow2"))
        #expect(try ChainFixture.clean(d.file("top.qcow2")))
        // Same as qemu-img's unsafe rebase of a copy.
        try mustRun("qemu-img", "rebase", "-u", "-F", "qcow2", "-b", "mid.qcow2", "top.qcow2", cwd: d.path)
        #expect(try ChainFixture.identical(d.file("top.qcow2"), d.file("expect.raw")))
    }

    static let errorCases: [[String]] = [
        ["-b", "nb.qcow2", "top.qcow2"], ["-F", "qcow2", "-b", "missing", "top.qcow2"], ["-F", "foo", "-b", "nb.qcow2", "top.qcow2"],
        ["top.qcow2"], ["-b", "", "nope.qcow2"], ["-u", "-b", "nb.qcow2", "top.qcow2"],
    ]

    @Test(qemuTrait, arguments: errorCases)
    func refusedRebaseChangesNothing(args: [String]) throws {
        let d = TempDir()
        try ChainFixture.chain(d)
        let before = try ChainFixture.snapshot(d)
        let ours = try run("img", ["rebase"] + args, cwd: d.path)
        #expect(try ChainFixture.snapshot(d) == before)
        let theirs = try run("qemu-img", ["rebase"] + args, cwd: d.path)
        #expect(ours.status == theirs.status)
        #expect(ours.stderr == asImg(theirs.stderr))
    }
}
