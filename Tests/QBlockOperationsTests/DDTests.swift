import Foundation
import Testing
import QBlock
@testable import QBlockCore
@testable import QBlockNBDWire
@testable import QBlockBitmaps
@testable import QBlockGraph
@testable import QBlockDrivers
@testable import QBlockOpen
@testable import QBlockOperations
@testable import QBlockJobs
@testable import QBlockNBDServer
@testable import QBlockMonitor
import TestSupport

@Suite(.serialized) struct DDTests {
    static let cases: [[String]] = [
        ["if=sparse.raw", "of=out"],
        ["if=top.qcow2", "of=out", "bs=1M", "count=3", "skip=1"],
        ["if=top.qcow2", "of=out", "bs=64k"],
        ["-O", "qcow2", "if=text.raw", "of=out", "bs=1000", "count=5"],
        ["-O", "qcow2", "if=sparse.raw", "of=out", "bs=4k", "skip=3"],
        ["if=odd.raw", "of=out", "bs=4k"],
        ["if=odd.raw", "of=out", "bs=1000", "skip=2"],
        ["if=odd.raw", "of=out", "count=0"],
        ["-f", "qcow2", "if=mid.qcow2", "of=out", "bs=512", "count=3000"],
        // Warnings and errors.
        ["if=sparse.raw", "of=out", "skip=100000"],
        ["-f", "qcow2", "if=sparse.raw", "of=out"],
        ["if=sparse.raw"], ["of=out"],
        ["if=sparse.raw", "of=out", "bs=0"],
        ["if=sparse.raw", "of=out", "foo=1"],
        ["if=sparse.raw", "of=out", "foo"],
        ["if=sparse.raw", "of=out", "count=x"],
        ["if=nope", "of=out"],
        ["-O", "foo", "if=sparse.raw", "of=out"],
    ]

    @Test(qemuTrait, arguments: cases)
    func ddMatchesQemu(args: [String]) throws {
        let a = TempDir(), b = TempDir()
        for d in [a, b] { try ConvertFixtures.all(d) }
        let before = ConvertFixtures.contents(a.file("sparse.raw"))
        let ours = try run("img", ["dd"] + args, cwd: a.path)
        let theirs = try run("qemu-img", ["dd"] + args, cwd: b.path)
        #expect(ours.stdout == theirs.stdout)
        #expect(ours.stderr == asImg(theirs.stderr))
        #expect(ours.status == theirs.status)
        #expect(ConvertFixtures.contents(a.file("sparse.raw")) == before)
        let exists = FileManager.default.fileExists(atPath: b.file("out"))
        #expect(FileManager.default.fileExists(atPath: a.file("out")) == exists)
        guard exists else { return }
        let format = args.firstIndex(of: "-O").map { args[$0 + 1] } ?? "raw"
        if format == "raw" {
            #expect(ConvertFixtures.contents(a.file("out")) == ConvertFixtures.contents(b.file("out")))
        } else {
            let cmp = try run("qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", a.file("out"), b.file("out"))
            #expect(cmp.status == 0, "\(cmp)")
            #expect(try run("qemu-img", "check", a.file("out")).status == 0)
        }
    }
}
