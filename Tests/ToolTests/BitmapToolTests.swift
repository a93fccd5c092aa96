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

/// `img bitmap`, `img info`, `img convert --bitmaps` and `img measure` against qemu-img 7.2:
/// same messages, exit codes, resulting images (info, check, bitmap contents).
@Suite(.serialized, .enabled(if: BitmapFixtures.ready, Comment(rawValue: NBDHarness.missing)))
struct BitmapToolTests {
    /// qemu-img's node names ('#block123') vary from run to run.
    static func masked(_ s: String) -> String {
        s.replacingOccurrences(of: "#block[0-9]+", with: "#block", options: .regularExpression)
    }


    /// Runs `qemu-img bitmap ARGS` and `img bitmap ARGS` on two copies of `source` ("X"
    /// in `args` is the image) and compares output, status, and the images afterwards.
    func compareBitmapCommand(_ args: [String], source: String, dir: TempDir) throws {
        let theirs = dir.file("theirs.qcow2"), ours = dir.file("ours.qcow2")
        for p in [theirs, ours] {
            try? FileManager.default.removeItem(atPath: p)
            try FileManager.default.copyItem(atPath: source, toPath: p)
        }
        let q = try run("qemu-img", ["bitmap"] + args.map { $0 == "X" ? theirs : $0 })
        let o = try run("img", ["bitmap"] + args.map { $0 == "X" ? ours : $0 })
        let label = args.joined(separator: " ")
        #expect(o.status == q.status, "\(label)")
        #expect(Self.masked(o.stderr) == Self.masked(asImg(q.stderr).replacingOccurrences(of: theirs, with: ours)), "\(label)")
        #expect(o.stdout == q.stdout, "\(label)")
        #expect(try BitmapFixtures.info(ours) == (try BitmapFixtures.info(theirs)), "\(label)")
        #expect(try run("qemu-img", "check", ours).status == (try run("qemu-img", "check", theirs)).status, "\(label)")
    }

    static let operations: [[String]] = [
        ["--add", "X", "new"], ["--add", "-g", "512", "X", "new"], ["--add", "--disable", "X", "new"],
        ["--add", "X", "b0"], ["--add", "X", ""], ["--add", "-g", "1000", "X", "c"], ["--add", "-g", "4G", "X", "c"],
        ["--add", "-g", "2G", "X", "c"], ["--add", "-g", "abc", "X", "c"], ["--add", "X", String(repeating: "x", count: 1023)],
        ["--add", "X", String(repeating: "x", count: 1024)], ["--remove", "X", "b1"], ["--remove", "X", "zz"],
        ["--clear", "X", "b0"], ["--clear", "X", "zz"], ["--enable", "X", "off"], ["--disable", "X", "b0"],
        ["--enable", "X", "zz"], ["--merge", "b1", "X", "off"], ["--merge", "zz", "X", "off"],
        ["--add", "-g", "1k", "--add", "X", "c2"], ["--add", "--remove", "--add", "X", "c3"], ["--remove", "--remove", "X", "b0"],
        ["X", "b0"], ["--remove", "-g", "64k", "X", "b0"], ["-F", "qcow2", "--merge", "b0", "X", "b1"],
        ["--merge", "b0", "-b", "/nonexistent.qcow2", "X", "b1"], ["--add", "X"], ["--add", "X", "b0", "extra"],
    ]

    @Test(arguments: operations)
    func bitmapCommandMatchesQemuImg(_ args: [String]) throws {
        let dir = TempDir("bmt")
        let source = try BitmapFixtures.qemuImage(dir)
        try compareBitmapCommand(args, source: source, dir: dir)
    }

    /// Operations on bitmaps left in use by a killed writer.
    @Test(arguments: [["--clear", "X", "b0"], ["--enable", "X", "off"], ["--disable", "X", "b0"], ["--merge", "b1", "X", "b0"],
                      ["--merge", "b0", "X", "b1"], ["--remove", "X", "b0"], ["--add", "X", "b0"], ["--add", "X", "fresh"]])
    func inUseBitmapsLikeQemuImg(_ args: [String]) throws {
        let dir = TempDir("bmt")
        let source = try BitmapFixtures.qemuImage(dir)
        try BitmapFixtures.killWriter(source, dir: dir)
        #expect(try mustRun("qemu-img", "info", source).stdout.contains("in-use"))
        try compareBitmapCommand(args, source: source, dir: dir)
    }

    /// Merging from another image (-b, -F) gives the bits QEMU gives.
    @Test func mergeFromAnotherImage() throws {
        let dir = TempDir("bmt")
        let source = try BitmapFixtures.qemuImage(dir)
        let other = try BitmapFixtures.qemuImage(dir, granularity: 4096, name: "other.qcow2")
        try mustRun("qemu-io", "-f", "qcow2", "-c", "write 6M 8k", other)
        let args = ["--merge", "b0", "-b", other, "-F", "qcow2", "X", "off"]
        try compareBitmapCommand(args, source: source, dir: dir)
        #expect(try BitmapFixtures.map("qemu-nbd", dir.file("ours.qcow2"), "off", dir: dir)
                == (try BitmapFixtures.map("qemu-nbd", dir.file("theirs.qcow2"), "off", dir: dir)))
    }

    /// A sequence of bitmap operations and writes gives byte-identical files with our tools
    /// and QEMU's: same clusters allocated, same tables, directory, header extension, and
    /// freed bitmap data discarded in the file as QEMU does.
    @Test func sameBytesAsQemu() throws {
        let dir = TempDir("bmt")
        let theirs = dir.file("theirs.qcow2"), ours = dir.file("ours.qcow2")
        try mustRun("qemu-img", "create", "-q", "-f", "qcow2", theirs, "64M")
        try FileManager.default.copyItem(atPath: theirs, toPath: ours)
        let steps: [(String, [String])] = [
            ("bitmap", ["--add", "-g", "4k", "X", "a"]), ("io", ["write 1M 1M"]), ("bitmap", ["--add", "--disable", "X", "b"]),
            ("io", ["write -z 8M 3M"]), ("bitmap", ["--merge", "a", "X", "b"]), ("bitmap", ["--clear", "X", "a"]),
            ("io", ["discard 1M 64k"]), ("bitmap", ["--remove", "X", "a"]),
        ]
        for (tool, args) in steps {
            if tool == "io" {
                try mustRun("qemu-io", "-f", "qcow2", "-c", args[0], theirs)
                try mustRun("io", "-f", "qcow2", "-c", args[0], ours)
            } else {
                try BitmapFixtures.must("qemu-img", ["bitmap"] + args.map { $0 == "X" ? theirs : $0 })
                try BitmapFixtures.must("img", ["bitmap"] + args.map { $0 == "X" ? ours : $0 })
            }
            #expect(try Data(contentsOf: URL(fileURLWithPath: ours)) == Data(contentsOf: URL(fileURLWithPath: theirs)),
                    "after \(tool) \(args)")
        }
    }

    /// info (human and JSON) lists bitmaps exactly as qemu-img does.
    @Test func infoMatchesQemuImg() throws {
        let dir = TempDir("bmt")
        let source = try BitmapFixtures.qemuImage(dir)
        for output in ["human", "json"] {
            let q = try mustRun("qemu-img", "info", "--output=\(output)", source).stdout
            #expect(try run("img", "info", "--output=\(output)", source).stdout == q)
        }
    }

    /// convert --bitmaps (and its errors) as qemu-img convert --bitmaps.
    @Test(arguments: [["--bitmaps", "-O", "qcow2"], ["--bitmaps", "-O", "qcow2", "-o", "cluster_size=4096"],
                      ["--bitmaps", "-O", "raw"], ["--skip-broken-bitmaps", "-O", "qcow2"],
                      ["--bitmaps", "-O", "qcow2", "-o", "compat=0.10"]])
    func convertBitmapsMatchesQemuImg(_ options: [String]) throws {
        let dir = TempDir("bmt")
        let source = try BitmapFixtures.qemuImage(dir)
        let theirs = dir.file("theirs.out"), ours = dir.file("ours.out")
        let q = try run("qemu-img", ["convert"] + options + [source, theirs])
        let o = try run("img", ["convert"] + options + [source, ours])
        #expect(o.status == q.status && o.stderr == asImg(q.stderr).replacingOccurrences(of: theirs, with: ours))
        guard q.status == 0, options.contains("qcow2") else { return }
        #expect(try BitmapFixtures.info(ours) == (try BitmapFixtures.info(theirs)))
        #expect(try BitmapFixtures.checkClean(ours))
        for name in ["b0", "b1", "off"] {
            #expect(try BitmapFixtures.map("qemu-nbd", ours, name, dir: dir) == (try BitmapFixtures.map("qemu-nbd", theirs, name, dir: dir)))
        }
        try mustRun("qemu-img", "compare", ours, theirs)
        // (With 4 KiB clusters the copy itself lays clusters out differently, bitmaps or not.)
        if !options.contains(where: { $0.hasPrefix("cluster_size") }) {
            #expect(try Data(contentsOf: URL(fileURLWithPath: ours)) == Data(contentsOf: URL(fileURLWithPath: theirs)), "byte-identical")
        }
    }

    /// A source with an inconsistent bitmap: refused, or skipped with a warning.
    @Test(arguments: [false, true])
    func convertInconsistentBitmap(skip: Bool) throws {
        let dir = TempDir("bmt")
        let source = try BitmapFixtures.qemuImage(dir)
        try BitmapFixtures.killWriter(source, dir: dir)
        let options = ["--bitmaps", "-O", "qcow2"] + (skip ? ["--skip-broken-bitmaps"] : [])
        let theirs = dir.file("theirs.out"), ours = dir.file("ours.out")
        let q = try run("qemu-img", ["convert"] + options + [source, theirs])
        let o = try run("img", ["convert"] + options + [source, ours])
        #expect(o.status == q.status && o.stderr == asImg(q.stderr))
        if q.status == 0 { #expect(try BitmapFixtures.info(ours) == (try BitmapFixtures.info(theirs))) }
    }

    /// measure reports "bitmaps size" as qemu-img does.
    @Test(arguments: [["-O", "qcow2"], ["-O", "qcow2", "-o", "cluster_size=4k"], ["-O", "raw"], ["--output=json", "-O", "qcow2"]])
    func measureMatchesQemuImg(_ options: [String]) throws {
        let dir = TempDir("bmt")
        let source = try BitmapFixtures.qemuImage(dir)
        // Only the lines about bitmaps and full allocation: qemu-img's "required size" of a
        // freshly written file depends on the host's page cache state (SEEK_DATA before
        // writeback), with or without bitmaps.
        func relevant(_ s: String) -> [Substring] {
            s.split(separator: "\n").filter { $0.contains("bitmaps") || $0.contains("fully") }
        }
        let q = try BitmapFixtures.must("qemu-img", ["measure"] + options + [source])
        let o = try run("img", ["measure"] + options + [source])
        #expect(relevant(o.stdout) == relevant(q.stdout))
        #expect(q.stdout.contains("bitmaps") == !options.contains("raw"))
    }
}
