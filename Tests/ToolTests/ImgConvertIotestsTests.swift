import Foundation
import Testing
import QBlock
import TestSupport

/// The qemu-iotests gaps of `img convert`, `create`, `commit` and `amend` closed together
/// (iotests 020, 082, 150, 251, 302), each compared with qemu-img on the same input.
@Suite struct ImgConvertIotestsTests {
    static let haveQemuNBD = Tools.qemuAvailable && Tools.which("qemu-nbd") != nil

    /// Runs `args` with our img and with qemu-img in one folder (`{}` in an argument is
    /// replaced by the output name: "ours" or "theirs"); expects the same output and status.
    @discardableResult
    private func same(_ args: [String], in dir: TempDir, filterTheirs: (String) -> String = { $0 },
                      sourceLocation: SourceLocation = #_sourceLocation) throws -> (RunResult, RunResult) {
        let ours = try run("img", args.map { $0.replacingOccurrences(of: "{}", with: "ours") }, cwd: dir.path)
        let theirs = try run("qemu-img", args.map { $0.replacingOccurrences(of: "{}", with: "theirs") }, cwd: dir.path)
        let cmd = args.joined(separator: " ")
        #expect(ours.stdout.replacingOccurrences(of: "ours", with: "{}")
                == filterTheirs(theirs.stdout).replacingOccurrences(of: "theirs", with: "{}"), "stdout of \(cmd)",
                sourceLocation: sourceLocation)
        #expect(ours.stderr.replacingOccurrences(of: "ours", with: "{}")
                == asImg(theirs.stderr).replacingOccurrences(of: "theirs", with: "{}"), "stderr of \(cmd)",
                sourceLocation: sourceLocation)
        #expect(ours.status == theirs.status, "status of \(cmd)", sourceLocation: sourceLocation)
        return (ours, theirs)
    }

    private func bytes(_ path: String) -> Data? { FileManager.default.contents(atPath: path) }

    // MARK: --salvage (iotest 251)

    /// A json: blkdebug source over `image` failing block status at `statusFail` and reads at
    /// `readFail` (byte offsets, one sector each) with EIO.
    static func blkdebugSource(_ format: String, _ image: String, statusFail: [Int], readFail: [Int]) -> String {
        let rules = statusFail.map { "{'event': 'none', 'iotype': 'block-status', 'errno': 5, 'sector': \($0 / 512)}" }
            + readFail.map { "{'event': 'none', 'iotype': 'read', 'errno': 5, 'sector': \($0 / 512)}" }
        return "json:{'driver': 'blkdebug', 'image': {'driver': '\(format)', 'file': {'driver': 'file', 'filename': '\(image)'}},"
            + " 'inject-error': [\(rules.joined(separator: ", "))]}"
    }

    @Test(qemuTrait, arguments: ["qcow2", "raw"])
    func salvageMatchesQemu(format: String) throws {
        let dir = TempDir()
        let image = dir.file("src.\(format)")
        try mustRun("qemu-img", "create", "-q", "-f", format, image, "8M")
        try mustRun("qemu-io", "-f", format, "-c", "write -q -P 42 0 8M", image)
        let source = Self.blkdebugSource(format, image, statusFail: [2 << 20 + 8192, 5 << 20 + 512],
                                         readFail: [4 << 20 - 65536, 5 << 20 + 512, 6 << 20, 6 << 20 + 512, 6 << 20 + 1536])
        let ours = try run("img", ["convert", "--salvage", "-O", format, source, dir.file("ours.out")])
        let theirs = try run("qemu-img", "convert", "--salvage", "-O", format, source, dir.file("theirs.out"))
        #expect(ours.status == 0 && theirs.status == 0 && ours.stdout.isEmpty, "\(ours)")
        // The same warnings: the block status ones of qemu-img's counting pass first, then
        // those of the copy. (qemu-img reports the copy's in the order its reads complete,
        // ours in guest order: compared as sets.)
        let o = ours.stderr.split(separator: "\n"), t = asImg(theirs.stderr).split(separator: "\n")
        #expect(o.count == 9 && o.prefix(2) == t.prefix(2) && o.sorted() == t.sorted(), "\(ours.stderr) vs \(theirs.stderr)")
        #expect(o[2] == "img: warning: error while reading block status at offset \(2 << 20 + 8192): Input/output error")
        #expect(o.last == "img: warning: error while reading offset \(6 << 20 + 1536): Input/output error")
        let output = try #require(bytes(dir.file("ours.out")))
        #expect(output == bytes(dir.file("theirs.out")))
        // The unreadable sectors are zeros, the rest the pattern.
        try mustRun("qemu-img", "convert", "-O", "raw", dir.file("ours.out"), dir.file("ours.raw"))
        let data = try #require(bytes(dir.file("ours.raw")))
        #expect(data[(6 << 20)..<(6 << 20 + 1024)].allSatisfy { $0 == 0 })
        #expect(data[(6 << 20 + 1024)..<(6 << 20 + 1536)].allSatisfy { $0 == 42 })
        #expect(data[(6 << 20 + 1536)..<(6 << 20 + 2048)].allSatisfy { $0 == 0 })
        #expect(data.filter { $0 == 0 }.count == 5 * 512)
        // -q: the same bytes, no warnings.
        let quiet = try same(["convert", "-q", "--salvage", "-O", format, source, "{}.q"], in: dir).0
        #expect(quiet.status == 0 && quiet.stderr.isEmpty, "\(quiet)")
        #expect(bytes(dir.file("ours.q")) == output)
    }

    /// Without --salvage the same source fails; with -C (copy offloading) salvage is refused
    /// as qemu-img refuses it.
    @Test(qemuTrait)
    func salvageConflictsMatchQemu() throws {
        let dir = TempDir()
        let image = dir.file("src.qcow2")
        try mustRun("qemu-img", "create", "-q", "-f", "qcow2", image, "1M")
        for args in [["convert", "-C", "--salvage", "-O", "qcow2", image, "{}"], ["convert", "-C", "-c", "-O", "qcow2", image, "{}"],
                     ["convert", "-C", "-S", "4k", "-O", "qcow2", image, "{}"]] {
            try same(args, in: dir)
        }
    }

    // MARK: json: names (iotests 150, 020)

    @Test(qemuTrait, arguments: ["qcow2", "raw"])
    func convertOfJSONSourceMatchesQemu(format: String) throws {
        let dir = TempDir()
        for sparse in ["512", "0"] {
            try same(["convert", "-O", format, "-S", sparse, "json:{ 'driver': 'null-co', 'size': 1048576, 'read-zeroes': true }",
                      "{}.\(sparse)"], in: dir)
            let ours = try run("qemu-img", "map", "--output=json", "-f", format, dir.file("ours.\(sparse)"))
            let theirs = try run("qemu-img", "map", "--output=json", "-f", format, dir.file("theirs.\(sparse)"))
            #expect(ours.stdout.replacingOccurrences(of: "ours", with: "X") == theirs.stdout.replacingOccurrences(of: "theirs", with: "X"))
        }
    }

    @Test(qemuTrait)
    func jsonBackingFileCreateAndFailingCommitMatchQemu() throws {
        let dir = TempDir()
        let base = dir.file("base.qcow2")
        try mustRun("qemu-img", "create", "-q", "-f", "qcow2", base, "1M")
        let backing = "json:{'driver': 'qcow2', 'file': { 'driver': 'blkdebug', 'inject-error': [{ 'event': 'write_aio', 'errno': 28,"
            + " 'once': true }], 'image': { 'driver': 'file', 'filename': '\(base)' }}}"
        try same(["create", "-f", "qcow2", "-b", backing, "-F", "qcow2", "{}.qcow2"], in: dir)
        for name in ["ours", "theirs"] {
            try mustRun("qemu-io", "-f", "qcow2", "-c", "write -q 0 64k", dir.file("\(name).qcow2"))
        }
        let (ours, _) = try same(["commit", "{}.qcow2"], in: dir)
        #expect(ours.stderr == "img: Block job failed: No space left on device\n")
        // The backing file is found relative to nothing: a json: name stands for itself.
        // (Its node's name in the chain's report differs: a json: name of our own.)
        let info = try run("img", ["info", "--backing-chain", dir.file("ours.qcow2")])
        let theirs = try run("qemu-img", "info", "--backing-chain", dir.file("theirs.qcow2"))
        let backingLine = { (s: String) in s.split(separator: "\n").first { $0.hasPrefix("backing file:") } }
        #expect(info.status == 0 && backingLine(info.stdout) != nil && backingLine(info.stdout) == backingLine(theirs.stdout), "\(info)")
    }

    // MARK: -c -S 0 and -n -o (iotest 122)

    /// With `-S 0` a compressed target keeps its zero clusters as (compressed) data; `-o`
    /// with `-n` is refused.
    @Test(qemuTrait)
    func compressedFullAllocationAndSkipCreateOptionsMatchQemu() throws {
        let dir = TempDir()
        let src = dir.file("src")
        try mustRun("qemu-img", "create", "-q", "-f", "qcow2", src, "4M")
        try mustRun("qemu-io", "-f", "qcow2", "-c", "write -q -P 0x22 0 1M", "-c", "write -q -P 0 1M 1M", src)
        try same(["convert", "-O", "qcow2", "-c", "-S", "0", "src", "{}"], in: dir)
        let ours = try run("qemu-img", "map", "--output=json", dir.file("ours"))
        let theirs = try run("qemu-img", "map", "--output=json", dir.file("theirs"))
        #expect(ours.stdout == theirs.stdout && ours.stdout.contains("\"length\": 4194304"), "\(ours)")
        #expect(try run("qemu-img", "compare", "src", dir.file("ours"), cwd: dir.path).status == 0)
        try same(["convert", "-n", "-O", "qcow2", "-o", "cluster_size=4k", "src", "{}"], in: dir)
    }

    // MARK: creating on an NBD export (iotest 302)

    @Test(.enabled(if: haveQemuNBD, "needs qemu-nbd and qemu-img"))
    func convertOntoNBDExportMatchesQemu() throws {
        let dir = TempDir()
        let source = dir.file("src.qcow2")
        try mustRun("qemu-img", "create", "-q", "-f", "qcow2", source, "1G")
        try mustRun("qemu-io", "-f", "qcow2", "-c", "write -q 1m 64k", source)
        var checks: [String: String] = [:]
        for name in ["ours", "theirs"] {
            let target = dir.file("\(name).raw")
            try mustRun("truncate", "-s", "458752", target)
            let s = try NBDHarness.start("qemu-nbd", ["-t", "-f", "raw", "-x", "exp"], image: target, dir: dir, tag: name)
            defer { s.stop() }
            let r = try run(name == "ours" ? "img" : "qemu-img", ["convert", "-f", "qcow2", "-O", "qcow2", "-c", source, s.uri("exp")])
            #expect(r.status == 0 && r.stderr.isEmpty, "\(name): \(r)")
            let compare = try run("qemu-img", "compare", source, s.uri("exp"))
            #expect(compare.stdout == "Images are identical.\n", "\(name): \(compare)")
            checks[name] = try run("qemu-img", "check", "--output=json", "-f", "qcow2", s.uri("exp")).stdout
                .replacingOccurrences(of: "\(name).sock", with: "X.sock")
        }
        #expect(checks["ours"] != nil && checks["ours"] == checks["theirs"], "\(checks)")
        // The same qcow2 bytes (header, tables, compressed cluster) in the export.
        #expect(bytes(dir.file("ours.raw")) == bytes(dir.file("theirs.raw")))
        // What cannot be done on an export: grow it, preallocate it, file-only options.
        let small = dir.file("small.raw")
        try mustRun("truncate", "-s", "458752", small)
        let s = try NBDHarness.start("qemu-nbd", ["-t", "-f", "raw", "-x", "exp"], image: small, dir: dir, tag: "small")
        defer { s.stop() }
        try same(["convert", "-f", "qcow2", "-O", "raw", source, s.uri("exp")], in: dir)
        try same(["create", "-f", "raw", "-o", "preallocation=full", s.uri("exp"), "64k"], in: dir)
        try same(["create", "-f", "raw", s.uri("exp"), "1M"], in: dir)
        try same(["create", "-f", "qcow2", "-o", "extent_size_hint=1M", s.uri("exp"), "64k"], in: dir)
        #expect(bytes(small) == Data(count: 458752))
        try same(["create", "-f", "raw", s.uri("exp"), "64k"], in: dir)
        // A read-only export cannot be opened for writing at all.
        let ro = try NBDHarness.start("qemu-nbd", ["-t", "-r", "-f", "raw", "-x", "exp"], image: small, dir: dir, tag: "ro")
        defer { ro.stop() }
        try same(["create", "-f", "qcow2", ro.uri("exp"), "64k"], in: dir)
        try mustRun("qemu-img", "create", "-q", "-f", "raw", dir.file("tiny.raw"), "64k")
        try same(["convert", "-n", "-O", "raw", dir.file("tiny.raw"), ro.uri("exp")], in: dir)
        // An export the server does not have: its words on a line of their own.
        try same(["create", "-f", "qcow2", ro.uri("nope"), "64k"], in: dir)
        try same(["info", ro.uri("nope")], in: dir)
    }

    // MARK: -o help (iotest 082)

    /// QEMU's help lines for options this library refuses (qcow2 encryption's `encrypt.*`,
    /// external data files): not listed by ours. (`encryption` is listed: `off` is accepted.)
    static func withoutRefusedOptions(_ s: String) -> String {
        s.split(separator: "\n", omittingEmptySubsequences: false).filter {
            !($0.hasPrefix("  encrypt.") || $0.hasPrefix("  data_file"))
        }.joined(separator: "\n")
    }

    static let helpCases: [[String]] = [
        ["create", "-f", "qcow2", "-o", "help", "{}", "1M"], ["create", "-f", "qcow2", "-o", "?", "{}", "1M"],
        ["create", "-f", "qcow2", "-o", "cluster_size=4k,help", "{}", "1M"], ["create", "-f", "qcow2", "-o", "cluster_size=4k", "-o", "help", "{}"],
        ["create", "-f", "raw", "-o", "help", "{}"], ["create", "-o", "help"], ["create", "-f", "qcow2", "-o", "help"],
        ["create", "-f", "bochs", "-o", "help"], ["create", "-f", "foo", "-o", "help"],
        ["create", "-f", "qcow2", "-u", "-o", "backing_file={}.b,,help", "{}", "1M"],
        ["create", "-f", "qcow2", "-o", "backing_file=x,", "-o", "help", "{}"], ["create", "-f", "qcow2", "-o", ",help", "{}"],
        ["create", "-f", "qcow2", "-o", "", "{}"], ["create", "-f", "raw", "-o", "help", "nbd://localhost/x"],
        ["create", "-f", "qcow2", "-o", "help", "null-co://"],
        ["convert", "-O", "qcow2", "-o", "help", "src", "{}"], ["convert", "-O", "raw", "-o", "?", "src", "{}"],
        ["convert", "-O", "qcow2", "-o", "help"], ["convert", "-o", "help"], ["convert", "-O", "bochs", "-o", "help"],
        ["convert", "-O", "qcow2", "-o", "help", "src", "nbd+unix:///e?socket=/nonexistent"],
        ["amend", "-f", "qcow2", "-o", "help", "src"], ["amend", "-f", "qcow2", "-o", "help"], ["amend", "-o", "help", "src"],
        ["amend", "-o", "help"], ["amend", "-f", "raw", "-o", "help"], ["amend", "-f", "bochs", "-o", "help"],
        ["amend", "-f", "qcow2", "-o", "cluster_size=4k,help", "src"], ["amend", "-f", "qcow2", "-o", ",,", "-o", "help", "src"],
    ]

    @Test(qemuTrait, arguments: helpCases)
    func optionHelpMatchesQemu(args: [String]) throws {
        let dir = TempDir()
        try mustRun("qemu-img", "create", "-q", "-f", "qcow2", dir.file("src"), "1M")
        try same(args, in: dir, filterTheirs: Self.withoutRefusedOptions)
    }

    /// `nocow` (listed by -o help) is taken by both formats, as the host file's option.
    static let nocowCases: [[String]] = [
        ["create", "-f", "qcow2", "-o", "nocow=on,extent_size_hint=1M", "{}", "1M"], ["create", "-f", "raw", "-o", "nocow=yes", "{}", "1M"],
        ["create", "-f", "raw", "-o", "nocow=on,preallocation=off", "{}", "1M"], ["create", "-f", "raw", "-o", "nocow=maybe", "{}", "1M"],
        ["convert", "-O", "qcow2", "-o", "nocow=on", "src", "{}"], ["amend", "-f", "qcow2", "-o", "nocow=on", "src"],
        ["amend", "-f", "qcow2", "-o", "extent_size_hint=1M", "src"], ["amend", "-f", "qcow2", "-o", "encryption=on", "src"],
    ]

    @Test(qemuTrait, arguments: nocowCases)
    func nocowMatchesQemu(args: [String]) throws {
        let dir = TempDir()
        try mustRun("qemu-img", "create", "-q", "-f", "qcow2", dir.file("src"), "1M")
        try same(args, in: dir)
    }

    /// The listing leaves out exactly the options we refuse: each one QEMU lists in addition is refused.
    @Test(qemuTrait)
    func optionsLeftOutOfHelpAreRefused() throws {
        let dir = TempDir()
        let theirs = try run("qemu-img", "create", "-f", "qcow2", "-o", "help", dir.file("x"), "1M").stdout
        let left = theirs.split(separator: "\n").filter { $0.hasPrefix("  ") && Self.withoutRefusedOptions(String($0)).isEmpty }
        #expect(left.count == 10)
        for line in left {
            let name = line.dropFirst(2).prefix { $0 != "=" }
            let r = try run("img", ["create", "-f", "qcow2", "-o", "\(name)=x", dir.file("y"), "1M"])
            #expect(r.status != 0, "\(name) accepted: \(r)")
        }
    }

    // MARK: driverless children of filters (iotests 066, 089)

    /// A blkdebug child named only by a file name: the protocol the name picks, wherever
    /// blkdebug is (a protocol driver's child is not probed); a copy-on-read filter's at the
    /// top is probed (a qcow2 image's guest data).
    @Test(qemuTrait)
    func filterChildNamedByFileNameMatchesQemuIO() throws {
        let dir = TempDir()
        let image = dir.file("t.qcow2")
        try mustRun("qemu-img", "create", "-q", "-f", "qcow2", image, "1M")
        try mustRun("qemu-io", "-f", "qcow2", "-c", "write -q -P 7 0 64k", image)
        for name in ["json:{'driver': 'qcow2', 'file': {'driver': 'blkdebug', 'image.filename': '\(image)'}}",
                     "json:{'driver': 'blkdebug', 'image': {'filename': '\(image)'}}",
                     "json:{'driver': 'raw', 'file': {'driver': 'blkdebug', 'image': {'filename': '\(image)'}}}",
                     "json:{'driver': 'copy-on-read', 'file': {'filename': '\(image)'}}"] {
            let args = ["-c", "read -P 7 0 64k", "-c", "read -P 0 64k 64k", name]
            let ours = try run("io", args), theirs = try run("qemu-io", args)
            let clean = { (s: String) in s.split(separator: "\n").filter { !$0.contains("ops/sec") }.joined(separator: "\n") }
            #expect(ours.status == theirs.status && clean(ours.stdout) == clean(theirs.stdout)
                    && ours.stderr.replacingOccurrences(of: "io: ", with: "qemu-io: ") == theirs.stderr, "\(name): \(ours) vs \(theirs)")
        }
    }
}
