import Foundation
import Testing
import TestSupport

@Suite struct CompareTests {
    static func images(_ d: TempDir) throws {
        func q(_ args: String...) throws { try mustRunArray("qemu-img", args, cwd: d.path) }
        func io(_ file: String, _ cmds: String...) throws {
            try mustRunArray("qemu-io", cmds.flatMap { ["-c", $0] } + [file], cwd: d.path)
        }
        try q("create", "-q", "-f", "qcow2", "a.qcow2", "1M")
        try q("create", "-q", "-f", "qcow2", "b.qcow2", "1M")
        try io("b.qcow2", "write -P 1 0 4k")
        try q("create", "-q", "-f", "qcow2", "c.qcow2", "2M")
        try io("c.qcow2", "write -P 1 1M 4k")
        try q("create", "-q", "-f", "qcow2", "d.qcow2", "2M")
        try q("create", "-q", "-f", "raw", "r.raw", "1M")
        try q("create", "-q", "-f", "qcow2", "e.qcow2", "1M")
        try io("e.qcow2", "write -P 1 512k 512k", "write -P 1 0 512k", "write -P 2 1000 10")
        try q("create", "-q", "-f", "qcow2", "f.qcow2", "1M")
        try io("f.qcow2", "write -P 1 0 1M")
        try q("create", "-q", "-f", "qcow2", "-b", "f.qcow2", "-F", "qcow2", "g.qcow2")
        try io("g.qcow2", "write -z 64k 64k")
    }

    static let cases: [[String]] = [
        ["a.qcow2", "a.qcow2"], ["a.qcow2", "b.qcow2"], ["a.qcow2", "c.qcow2"], ["-s", "a.qcow2", "c.qcow2"],
        ["a.qcow2", "d.qcow2"], ["-s", "a.qcow2", "d.qcow2"], ["c.qcow2", "a.qcow2"], ["a.qcow2", "nope"],
        ["-f", "raw", "a.qcow2", "d.qcow2"], ["-f", "foo", "a.qcow2", "d.qcow2"], ["a.qcow2"], ["-q", "a.qcow2", "b.qcow2"],
        ["-s", "a.qcow2", "r.raw"], ["a.qcow2", "r.raw"], ["e.qcow2", "f.qcow2"], ["-s", "e.qcow2", "f.qcow2"],
        ["-s", "f.qcow2", "f.qcow2"], ["-F", "raw", "b.qcow2", "a.qcow2"], ["g.qcow2", "f.qcow2"], ["-s", "g.qcow2", "f.qcow2"],
        ["-U", "f.qcow2", "g.qcow2"],
    ]

    @Test(qemuTrait, arguments: cases)
    func sameAsQemu(args: [String]) throws {
        _ = try expectSameAsQemu(["compare"] + args, setup: Self.images)
    }
}
