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

@Suite(.serialized) struct MeasureTests {
    static let cases: [[String]] = {
        var c: [[String]] = []
        for out in ["human", "json"] {
            for size in ["--size 1G", "--size 1000", "--size 100G", "--size 1P"] {
                c.append(["--output=\(out)"] + size.split(separator: " ").map(String.init))
                c.append(["--output=\(out)", "-O", "qcow2"] + size.split(separator: " ").map(String.init))
            }
            for file in ["sparse.raw", "top.qcow2", "mid.qcow2", "text.raw", "random.raw", "c.qcow2"] {
                c.append(["--output=\(out)", file])
                c.append(["--output=\(out)", "-O", "qcow2", file])
                c.append(["--output=\(out)", "-O", "qcow2", "-o", "cluster_size=4k,refcount_bits=1", file])
                c.append(["--output=\(out)", "-O", "qcow2", "-o", "cluster_size=2M,refcount_bits=64", file])
                c.append(["--output=\(out)", "-O", "qcow2", "-o", "compat=0.10", file])
            }
        }
        return c + [
            ["-O", "qcow2", "-o", "preallocation=full", "--size", "1G"],
            ["-O", "qcow2", "-o", "preallocation=metadata", "sparse.raw"],
            ["-O", "qcow2", "-o", "preallocation=falloc", "top.qcow2"],
            ["-O", "qcow2", "-o", "backing_file=x", "top.qcow2"],
            ["-O", "qcow2", "-o", "extended_l2=on", "--size", "1G"],
            ["-O", "qcow2", "-o", "cluster_size=512,refcount_bits=2", "--size", "3G"],
            ["-f", "raw", "sparse.raw"], ["-f", "qcow2", "-O", "qcow2", "top.qcow2"],
            // Errors.
            ["-O", "qcow2", "-o", "foo=bar", "--size", "1G"], ["-O", "qcow2", "-o", "cluster_size=3", "--size", "1G"],
            ["-O", "qcow2", "-o", "compat=0.10,refcount_bits=8", "--size", "1G"], ["-O", "qcow2", "-o", "compat=9", "--size", "1G"],
            ["-O", "qcow2", "-o", "refcount_bits=3", "--size", "1G"], ["--size", "1G", "sparse.raw"], [],
            ["-f", "raw", "--size", "1G"], ["-O", "foo", "--size", "1G"], ["nope"], ["--size", "-1"],
            ["-O", "qcow2", "-o", "cluster_size=512", "--size", "4T"], ["--output=xml", "--size", "1G"],
            ["-f", "qcow2", "sparse.raw"], ["a", "b"],
        ]
    }()

    @Test(qemuTrait, arguments: cases)
    func measureMatchesQemu(args: [String]) throws {
        let dir = TempDir()
        try ConvertFixtures.all(dir)
        try mustRun("qemu-img", "convert", "-c", "-O", "qcow2", dir.file("text.raw"), dir.file("c.qcow2"))
        let ours = try run("img", ["measure"] + args, cwd: dir.path)
        let theirs = try run("qemu-img", ["measure"] + args, cwd: dir.path)
        #expect(ours.stdout == theirs.stdout)
        #expect(ours.stderr == asImg(theirs.stderr))
        #expect(ours.status == theirs.status)
    }

    /// Persistent bitmaps of the source count (qemu-img prints "bitmaps size").
    @Test(qemuTrait, arguments: [[], ["-o", "cluster_size=4k"], ["-o", "cluster_size=2M"], ["-o", "compat=0.10"], ["--output=json"]])
    func bitmapsMatchQemu(args: [String]) throws {
        let dir = TempDir()
        let img = dir.file("bm.qcow2")
        try mustRun("qemu-img", "create", "-q", "-f", "qcow2", img, "10G")
        try mustRun("qemu-img", "bitmap", "--add", img, "b1")
        try mustRun("qemu-img", "bitmap", "--add", "-g", "512", img, "a-much-longer-bitmap-name")
        try mustRun("qemu-img", "bitmap", "--add", "-g", "2M", img, "b3")
        let ours = try run("img", ["measure", "-O", "qcow2"] + args + [img])
        let theirs = try run("qemu-img", ["measure", "-O", "qcow2"] + args + [img])
        #expect(ours.stdout == theirs.stdout)
        #expect(ours.status == theirs.status)
    }

    /// The formula against values qemu-img 7.2 printed (no QEMU needed).
    @Test(arguments: [
        (Int64(1) << 30, Int64(65536), Int64(4), Int64(1_074_135_040)),
        (Int64(1) << 50, Int64(65536), Int64(4), Int64(1_126_071_731_945_472)),
    ])
    func preallocatedSize(size: Int64, clusterSize: Int64, order: Int64, expected: Int64) {
        #expect(Qcow2Format.preallocSize(size, clusterSize: clusterSize, refcountOrder: order, l2eSize: 8) == expected)
    }
}
