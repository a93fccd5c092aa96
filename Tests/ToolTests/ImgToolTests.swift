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
import ToolSupport



@Suite struct ImgToolTests {
    // MARK: create

    static let rawCreateCases: [[String]] = [
        ["-f", "raw", "x", "1M"], ["x", "100"], ["-f", "raw", "x", "0"], ["-q", "-f", "raw", "x", "5000"],
        ["-f", "raw", "-o", "preallocation=full", "x", "5000"], ["-f", "raw", "-o", "preallocation=falloc", "x", "1M"],
        ["-f", "raw", "-o", "preallocation=off", "x", "1M"], ["-f", "raw", "-o", "size=2M", "x"],
        ["-f", "raw", "x", "1M", "-o", "preallocation=full"], ["-f", "raw", "-o", "preallocation=off,extent_size_hint=0", "x", "128k"],
        ["-f", "raw", "-o", "extent_size_hint=1M", "x", "128k"],
    ]

    @Test(qemuTrait, arguments: rawCreateCases)
    func rawCreateMatchesQemu(args: [String]) throws {
        let (a, b) = try expectSameAsQemu(["create"] + args)
        let ours = fileStat(a.file("x")), theirs = fileStat(b.file("x"))
        #expect(ours?.size == theirs?.size)
        #expect(ours?.blocks == theirs?.blocks)
        let info = try run("qemu-img", "info", "--output=json", "-f", "raw", a.file("x"))
        #expect(info.status == 0)
    }

    static let createErrorCases: [[String]] = [
        ["-f", "raw", "-o", "preallocation=metadata", "x", "1M"], ["-f", "raw", "-o", "preallocation=xx", "x", "1M"],
        ["-f", "raw", "-o", "size=2M", "x", "3M"], ["-f", "raw", "x"], ["-f", "raw", "x", "1x"], ["-f", "raw", "-o", "nocow", "x", "1M"],
        ["-f", "raw", "-b", "foo", "x", "1M"], ["-f", "foo", "x", "1M"], ["-f", "raw", "/nonexistent/x", "1M"],
        ["-f", "qcow2", "-o", "cluster_size=abc", "x", "1M"], ["-f", "qcow2", "-o", "lazy_refcounts=maybe", "x", "1M"],
        ["-f", "qcow2", "-o", "refcount_bits=x", "x", "1M"], ["-f", "qcow2", "-o", "foo=bar", "x", "1M"],
        ["-f", "qcow2", "x"], ["-f", "qcow2", "-b", "", "-F", "raw", "x", "1M"], ["-f", "qcow2", "-b", "x", "-F", "raw", "x", "1M"],
        ["-f", "qcow2", "-b", "nonexistent", "-F", "raw", "x", "1M"], ["-f", "bochs", "x", "1M"], ["-f", "cloop", "x", "1M"],
        ["-f", "raw", "-o", "extent_size_hint=5G", "x", "1M"], ["-f", "raw", "-o", "extent_size_hint=x", "x", "1M"],
        ["-f", "qcow2", "-o", "extent_size_hint=5G", "x", "1M"],
    ]

    @Test(qemuTrait, arguments: createErrorCases)
    func createErrorsMatchQemu(args: [String]) throws {
        _ = try expectSameAsQemu(["create"] + args)
    }

    /// `rebase -u -F` records any driver name QEMU has (iotests 031 writes `host_device`);
    /// an unknown name is refused, a safe rebase onto a format this build lacks fails to open.
    static let rebaseFormatNameCases: [[String]] = [
        ["-u", "-b", "/some/backing/file/path", "-F", "host_device", "t.qcow2"],
        ["-u", "-b", "/some/backing/file/path", "-F", "bogus", "t.qcow2"],
        ["-u", "-b", "b.raw", "-F", "raw", "t.qcow2"],
    ]

    @Test(qemuTrait, arguments: rebaseFormatNameCases)
    func rebaseFormatNamesMatchQemu(args: [String]) throws {
        let (a, b) = try expectSameAsQemu(["rebase"] + args) { dir in
            _ = try run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", dir.file("t.qcow2"), "1M")
            _ = try run("qemu-img", "create", "-q", "-f", "raw", dir.file("b.raw"), "1M")
        }
        #expect(try Data(contentsOf: URL(fileURLWithPath: a.file("t.qcow2"))) == Data(contentsOf: URL(fileURLWithPath: b.file("t.qcow2"))))
    }

    /// Size arguments go through QEMU's syntax (`SizeParser`), as qemu-img's `cvtnum` reads
    /// them: no exponent, no trailing blank, a fraction rounded half up, hexadecimal.
    static let createSizeSyntaxCases: [String] = [
        "1e3", "5 ", " 5", "+5", ".5k", "1e2k", "1.5e3k", "0.0005k", "0.5k", "1.k", "1.25k", "0x200", "1.5",
    ]

    @Test(qemuTrait, arguments: createSizeSyntaxCases)
    func createSizeSyntaxMatchesQemu(size: String) throws {
        let (a, b) = try expectSameAsQemu(["create", "-f", "raw", "x", size])
        #expect(fileStat(a.file("x"))?.size == fileStat(b.file("x"))?.size)
    }

    static let qcow2CreateCases: [[String]] = {
        var cases: [[String]] = []
        for cs in ["512", "4k", "64k", "2M"] {
            for compat in ["0.10", "1.1"] { cases.append(["-o", "cluster_size=\(cs),compat=\(compat)"]) }
        }
        cases.append(["-o", "lazy_refcounts=on,refcount_bits=8,compression_type=zstd"])
        cases.append(["-o", "refcount_bits=1", "-o", "cluster_size=4096"])
        cases.append(["-o", "preallocation=metadata"])
        cases.append(["-o", "compat=0.10,lazy_refcounts=on"])
        cases.append(["-o", "cluster_size=3000"])
        cases.append(["-o", "preallocation=falloc,extent_size_hint=0"])
        return cases
    }()

    /// qcow2 creation: same output as qemu-img, and qemu-img check finds the image clean
    /// and qemu-img info sees it as qemu-img's own. Needs the real qcow2 driver.
    @Test(qemuTrait, arguments: qcow2CreateCases)
    func qcow2CreateMatchesQemu(opts: [String]) throws {
        let (a, b) = try expectSameAsQemu(["create", "-f", "qcow2"] + opts + ["x.qcow2", "64M"])
        guard FileManager.default.fileExists(atPath: b.file("x.qcow2")) else { return }
        let check = try run("qemu-img", "check", a.file("x.qcow2"))
        #expect(check.status == 0, "\(check)")
        let ours = try run("qemu-img", "info", "--output=json", "x.qcow2", cwd: a.path)
        let theirs = try run("qemu-img", "info", "--output=json", "x.qcow2", cwd: b.path)
        #expect(ours.stdout == theirs.stdout)
    }

    @Test(qemuTrait) func qcow2OverlayCreateMatchesQemu() throws {
        let setup: (TempDir) throws -> Void = { d in
            try mustRun("qemu-img", "create", "-q", "-f", "raw", d.file("base.raw"), "3M")
        }
        for args in [["-b", "base.raw", "-F", "raw", "o.qcow2"], ["-b", "base.raw", "o.qcow2"],
                     ["-b", "base.raw", "-F", "qcow2", "o.qcow2"], ["-o", "backing_file=base.raw,backing_fmt=raw", "o.qcow2", "5M"],
                     ["-u", "-b", "missing.raw", "-F", "raw", "o.qcow2", "1M"], ["-F", "raw", "o.qcow2", "1M"]] {
            let (a, b) = try expectSameAsQemu(["create", "-f", "qcow2"] + args, setup: setup)
            if FileManager.default.fileExists(atPath: b.file("o.qcow2")) {
                let ours = try run("qemu-img", "info", "--output=json", "o.qcow2", cwd: a.path)
                let theirs = try run("qemu-img", "info", "--output=json", "o.qcow2", cwd: b.path)
                #expect(ours.stdout == theirs.stdout)
            }
        }
    }

    // MARK: info

    @Test(qemuTrait, arguments: [["--output=json"], [], ["--output=json", "--backing-chain"], ["--backing-chain"], ["-f", "raw"]])
    func rawInfoMatchesQemu(extra: [String]) throws {
        let dir = TempDir()
        _ = try Images.sparseRaw(dir)
        try writeFile(dir.file("odd.raw"), at: 0, [UInt8](repeating: 1, count: 1000))
        for image in ["sparse.raw", "odd.raw", "missing.raw"] {
            let ours = try run("img", ["info"] + extra + [image], cwd: dir.path)
            let theirs = try run("qemu-img", ["info"] + extra + [image], cwd: dir.path)
            #expect(ours.stdout == theirs.stdout)
            #expect(ours.stderr == asImg(theirs.stderr))
            #expect(ours.status == theirs.status)
        }
    }

    @Test(qemuTrait, arguments: [["--output=json"], [], ["--output=json", "--backing-chain"], ["--backing-chain"]])
    func qcow2InfoMatchesQemu(extra: [String]) throws {
        let dir = TempDir()
        _ = try Images.qcow2Chain(dir)
        try mustRun("qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", dir.file("v2.qcow2"), "1G")
        try FileManager.default.createDirectory(atPath: dir.file("sub"), withIntermediateDirectories: true)
        try mustRun("qemu-img", "create", "-q", "-f", "qcow2", "-b", "../base.raw", "-F", "raw", "sub/rel.qcow2", cwd: dir.path)
        try mustRun("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "gone.raw", "-F", "raw", "dangling.qcow2", "1M", cwd: dir.path)
        for image in ["mid.qcow2", "top.qcow2", "v2.qcow2", "sub/rel.qcow2", dir.file("sub/rel.qcow2"), "dangling.qcow2"] {
            let ours = try run("img", ["info"] + extra + [image], cwd: dir.path)
            let theirs = try run("qemu-img", ["info"] + extra + [image], cwd: dir.path)
            #expect(ours.stdout == theirs.stdout, "img info \(extra) \(image)")
            #expect(ours.stderr == asImg(theirs.stderr))
            #expect(ours.status == theirs.status)
        }
    }

    // MARK: check

    @Test(qemuTrait) func rawCheckIsUnsupported() throws {
        let dir = TempDir()
        _ = try Images.sparseRaw(dir)
        for extra in [[], ["--output=json"], ["-r", "leaks"], ["-r", "bogus"]] {
            let ours = try run("img", ["check"] + extra + ["-f", "raw", "sparse.raw"], cwd: dir.path)
            let theirs = try run("qemu-img", ["check"] + extra + ["-f", "raw", "sparse.raw"], cwd: dir.path)
            #expect(ours.status == theirs.status)
            #expect(ours.stderr == asImg(theirs.stderr))
        }
    }

    @Test func sizesForPeople() {
        #expect(qemuSizeString(1 << 30) == "1 GiB")
        #expect(qemuSizeString(200704) == "196 KiB")
        #expect(qemuSizeString(1572864) == "1.5 MiB")
        #expect(qemuSizeString(1000) == "0.977 KiB")
        #expect(qemuSizeString(0) == "0 B")
    }

    @Test func checkReportRendering() {
        var r = CheckResult()
        r.imageEndOffset = 524288; r.totalClusters = 64; r.allocatedClusters = 3; r.fragmentedClusters = 2; r.compressedClusters = 1
        let report = ImageCheckReport(filename: "t1.qcow2", format: "qcow2", result: r)
        #expect(report.humanText == "No errors were found on the image.\n3/64 = 4.69% allocated, 66.67% fragmented, 33.33% compressed clusters\nImage end offset: 524288\n")
        #expect(report.jsonText == """
            {
                "image-end-offset": 524288,
                "compressed-clusters": 1,
                "total-clusters": 64,
                "check-errors": 0,
                "allocated-clusters": 3,
                "filename": "t1.qcow2",
                "format": "qcow2",
                "fragmented-clusters": 2
            }

            """)
        #expect(report.exitCode == 0)
        var leaky = r
        leaky.leaks = 2
        #expect(ImageCheckReport(filename: "x", format: "qcow2", result: leaky).exitCode == 3)
        leaky.corruptions = 1
        let bad = ImageCheckReport(filename: "x", format: "qcow2", result: leaky)
        #expect(bad.exitCode == 2)
        #expect(bad.humanText.hasPrefix("\n1 errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n\n2 leaked clusters were found on the image.\n"))
    }

    @Test(qemuTrait, arguments: [[], ["--output=json"], ["-q"], ["-r", "leaks"], ["-r", "all"]])
    func qcow2CheckMatchesQemu(extra: [String]) throws {
        let setup: (TempDir) throws -> Void = { d in
            try mustRun("qemu-img", "create", "-q", "-f", "qcow2", d.file("c.qcow2"), "16M")
            try Images.qemuIO(d.file("c.qcow2"), format: "qcow2", ["write -P 1 0 1M", "write -c -P 2 2M 64k", "write -P 3 5M 64k"])
        }
        _ = try expectSameAsQemu(["check"] + extra + ["c.qcow2"], setup: setup)
    }

    // MARK: resize

    static let resizeCases: [[String]] = [
        ["-f", "raw", "r.raw", "+1M"], ["-f", "raw", "r.raw", "1M"], ["-f", "raw", "--shrink", "r.raw", "512k"],
        ["-f", "raw", "r.raw", "--", "-512k"], ["-f", "raw", "--shrink", "r.raw", "-512k"], ["-f", "raw", "r.raw", "1x"],
        ["-f", "raw", "--preallocation=full", "r.raw", "3M"], ["-f", "raw", "--preallocation=metadata", "r.raw", "3M"],
        ["-f", "raw", "--preallocation=bogus", "r.raw", "3M"], ["-q", "-f", "raw", "r.raw", "3M"], ["-f", "raw", "r.raw", "2M"],
        ["-f", "raw", "--shrink", "r.raw", "--", "-10M"], ["r.raw", "4M"], ["-f", "raw", "missing.raw", "1M"],
        ["-f", "raw", "--shrink", "--preallocation=falloc", "r.raw", "--", "-256k"],
        ["-f", "raw", "--shrink", "--preallocation=full", "r.raw", "1M"], ["-f", "raw", "--preallocation=falloc", "r.raw", "2M"],
    ]

    @Test(qemuTrait, arguments: resizeCases)
    func rawResizeMatchesQemu(args: [String]) throws {
        let (a, b) = try expectSameAsQemu(["resize"] + args) { d in
            try mustRun("qemu-img", "create", "-q", "-f", "raw", d.file("r.raw"), "2M")
        }
        #expect(fileStat(a.file("r.raw"))?.size == fileStat(b.file("r.raw"))?.size)
    }

    @Test(qemuTrait) func qcow2ResizeMatchesQemu() throws {
        let setup: (TempDir) throws -> Void = { d in
            try mustRun("qemu-img", "create", "-q", "-f", "qcow2", d.file("q.qcow2"), "64M")
        }
        for args in [["q.qcow2", "+1G"], ["q.qcow2", "32M"], ["--shrink", "q.qcow2", "32M"]] {
            let (a, _) = try expectSameAsQemu(["resize"] + args, setup: setup)
            try mustRun("qemu-img", "check", a.file("q.qcow2"))
        }
    }

    // MARK: bench

    @Test func benchReadsAndWrites() async throws {
        let dir = TempDir()
        let path = dir.file("b.raw")
        try await ImageCreator.create(format: "raw", path: path, size: 1 << 20)
        var read = try run("img", "bench", "-c", "1000", "-d", "8", "-f", "raw", path)
        #expect(read.status == 0, "\(read)")
        let lines = read.stdout.split(separator: "\n")
        #expect(lines.first == "Sending 1000 read requests, 4096 bytes each, 8 in parallel (starting at offset 0, step size 4096)")
        #expect(lines.count == 2 && lines[1].hasPrefix("Run completed in ") && lines[1].hasSuffix(" seconds."))
        let write = try run("img", "bench", "-w", "-c", "64", "-s", "16k", "-S", "16k", "--pattern=7", "-f", "raw",
                            "--flush-interval=16", "-d", "4", path)
        #expect(write.status == 0, "\(write)")
        #expect(write.stdout.contains("Sending flush every 16 requests\n"))
        let data = try Data(contentsOf: URL(fileURLWithPath: path))
        #expect(data.allSatisfy { $0 == 7 })
        read = try run("img", "bench", "-c", "10", "-o", "2M", "-f", "raw", path)
        #expect(read.status == 1)
        #expect(read.stderr == "img: Failed request: Input/output error\n")
        #expect(try run("img", "bench", "-d", "0", path).stderr == "img: Invalid queue depth specified\n")
    }

    @Test func benchKeepsDepthRequestsInFlight() async throws {
        let dir = TempDir()
        let path = dir.file("d.raw")
        try await ImageCreator.create(format: "raw", path: path, size: 1 << 20)
        let node = try await ImageOpener.open(path, options: OpenOptions(format: "raw"))
        var b = Bench()
        b.count = 300
        b.depth = 16
        b.write = true
        b.pattern = 0x42
        b.bufferSize = 512
        b.step = 4096
        _ = try await b.run(on: node)
        var buf = [UInt8](repeating: 0, count: 512)
        buf = try await read(node, at: 4096 * 200, count: buf.count)
        #expect(buf.allSatisfy { $0 == 0x42 })
        try await node.close()
    }

    @Test func optionStringParsing() {
        let p = ImageCreator.parseOptionString("cluster_size=4k,,x,lazy_refcounts,nocow,compat=1.1")
        #expect(p.map { "\($0.0)=\($0.1)" } == ["cluster_size=4k,x", "lazy_refcounts=on", "cow=off", "compat=1.1"])
    }
}
