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

/// Fixtures for convert, measure and dd tests, built with QEMU's tools in `dir`.
enum ConvertFixtures {
    /// A compressible text image of `size` bytes, with a hole in the middle.
    static func textRaw(_ dir: TempDir, _ name: String = "text.raw", size: Int = 2 << 20) throws -> String {
        let path = dir.file(name)
        var rng = SplitMix(seed: 7)
        let words = ["alpha ", "beta ", "gamma ", "qemu ", "block ", "disk\n"].map { Array($0.utf8) }
        var bytes: [UInt8] = []
        bytes.reserveCapacity(size)
        while bytes.count < size { bytes += words[Int(rng.next() % UInt64(words.count))] }
        bytes = Array(bytes.prefix(size))
        // A hole of 256 KiB and a run of zeros of 128 KiB.
        try writeFile(path, at: 0, Array(bytes[0..<(size / 4)]))
        try writeFile(path, at: Int64(size / 4 + 256 * 1024), Array(bytes[(size / 4 + 256 * 1024)...]))
        try writeFile(path, at: Int64(size / 2), [UInt8](repeating: 0, count: 128 * 1024))
        return path
    }

    /// `count` bytes of incompressible data.
    static func randomBytes(_ count: Int, seed: UInt64) -> [UInt8] {
        var rng = SplitMix(seed: seed)
        var out = [UInt8](repeating: 0, count: count)
        var i = 0
        while i < count {
            let v = rng.next()
            for k in 0..<8 where i + k < count { out[i + k] = UInt8(truncatingIfNeeded: v >> (8 * UInt64(k))) }
            i += 8
        }
        return out
    }

    /// Every fixture: a sparse raw file, a qcow2 chain (top.qcow2 → mid.qcow2 → base.raw)
    /// with compressed and zero clusters, a text image and a random one.
    static func all(_ dir: TempDir) throws {
        _ = try Images.sparseRaw(dir)
        _ = try Images.qcow2Chain(dir)
        _ = try textRaw(dir)
        let rnd = dir.file("random.raw")
        try truncateFile(rnd, to: 3 << 20)
        try writeFile(rnd, at: 0, randomBytes(3 << 20, seed: 11))
        // Short runs of data, written zeros and holes mixed (zero detection and its alignment).
        let mix = dir.file("mix.raw")
        try truncateFile(mix, to: 4 << 20)
        var rng = SplitMix(seed: 99)
        var pos = 0
        let sizes = [512, 1024, 4096, 8192, 12288, 65536]
        while pos < 4 << 20 {
            let n = min(sizes[Int(rng.next() % UInt64(sizes.count))], (4 << 20) - pos)
            switch rng.next() % 3 {
            case 0: try writeFile(mix, at: Int64(pos), randomBytes(n, seed: rng.next()))
            case 1: try writeFile(mix, at: Int64(pos), [UInt8](repeating: 0, count: n))
            default: break
            }
            pos += n
        }
        // A raw file whose size is not a multiple of 512.
        let odd = dir.file("odd.raw")
        try truncateFile(odd, to: 1_000_001)
        try writeFile(odd, at: 0, randomBytes(700_000, seed: 5))
    }

    /// The contents of a file, to show an input was left unchanged.
    static func contents(_ path: String) -> Data? { FileManager.default.contents(atPath: path) }
}

/// `qemu-img map --output=json` without host offsets, adjacent runs of the same kind
/// merged: where data, zeros and holes are (layouts may differ; allocation may not).
func allocationMap(_ path: String, format: String) throws -> [String] {
    let r = try mustRun("qemu-img", "map", "--output=json", "-f", format, path)
    var runs: [(start: Int64, length: Int64, kind: String)] = []
    for line in r.stdout.split(separator: "\n") {
        func field(_ name: String) -> String? {
            guard let k = line.range(of: "\"\(name)\": ") else { return nil }
            return String(line[k.upperBound...].prefix { $0 != "," && $0 != "}" })
        }
        guard let start = field("start").flatMap({ Int64($0) }), let length = field("length").flatMap({ Int64($0) }) else { continue }
        let kind = ["depth", "present", "zero", "data"].map { field($0) ?? "" }.joined(separator: " ")
        if let last = runs.last, last.kind == kind, last.start + last.length == start {
            runs[runs.count - 1].length += length
        } else {
            runs.append((start, length, kind))
        }
    }
    return runs.map { "\($0.start)+\($0.length): \($0.kind)" }
}

@Suite(.serialized) struct ConvertTests {
    /// (arguments before the output name, output format, sources)
    static let cases: [[String]] = [
        ["-O", "qcow2", "sparse.raw"],
        ["-O", "raw", "top.qcow2"],
        ["-O", "qcow2", "top.qcow2"],
        ["-O", "qcow2", "-o", "cluster_size=4k,refcount_bits=8", "sparse.raw"],
        ["-O", "qcow2", "-B", "mid.qcow2", "-F", "qcow2", "top.qcow2"],
        ["-O", "raw", "sparse.raw", "top.qcow2", "text.raw"],
        ["-O", "qcow2", "sparse.raw", "random.raw", "mid.qcow2"],
        ["-O", "qcow2", "-S", "0", "sparse.raw"],
        ["-O", "raw", "-S", "0", "sparse.raw"],
        ["-O", "qcow2", "-S", "64k", "text.raw"],
        ["-W", "-m", "16", "-O", "qcow2", "text.raw"],
        ["-m", "1", "-O", "qcow2", "-o", "compat=0.10", "top.qcow2"],
        ["-O", "raw", "mid.qcow2"],
        ["-O", "qcow2", "-o", "cluster_size=512", "odd.raw", "top.qcow2"],
        ["-O", "qcow2", "-c", "odd.raw", "text.raw"],
        ["-O", "raw", "odd.raw", "odd.raw"],
        ["-W", "-m", "16", "-c", "-O", "qcow2", "-o", "cluster_size=4k", "text.raw", "top.qcow2"],
        ["-c", "-O", "qcow2", "-B", "mid.qcow2", "-F", "qcow2", "top.qcow2"],
        ["-O", "raw", "mix.raw"], ["-O", "raw", "-S", "8k", "mix.raw"], ["-O", "raw", "-S", "512", "mix.raw"],
        ["-O", "qcow2", "mix.raw"], ["-O", "qcow2", "-o", "cluster_size=4k", "-S", "8k", "mix.raw"],
        ["-O", "qcow2", "-S", "512", "mix.raw"], ["-c", "-O", "qcow2", "-o", "cluster_size=4k", "mix.raw"],
    ]

    @Test(qemuTrait, arguments: cases)
    func convertMatchesQemu(args: [String]) throws {
        let dir = TempDir()
        try ConvertFixtures.all(dir)
        let format = args[args.firstIndex(of: "-O")! + 1]
        let sources = args.filter { $0.hasSuffix(".raw") || $0.hasSuffix(".qcow2") }.filter { args.firstIndex(of: $0)! > 0 && args[args.firstIndex(of: $0)! - 1] != "-B" }
        let before = sources.map { ConvertFixtures.contents(dir.file($0)) }
        let ours = try run("img", ["convert"] + args + ["ours.img"], cwd: dir.path)
        let theirs = try run("qemu-img", ["convert"] + args + ["theirs.img"], cwd: dir.path)
        #expect(ours.status == 0, "\(ours)")
        #expect(ours.status == theirs.status)
        #expect(ours.stdout == theirs.stdout)
        // Same guest contents as QEMU's conversion.
        let cmp = try run("qemu-img", "compare", "-f", format, "-F", format, dir.file("ours.img"), dir.file("theirs.img"))
        #expect(cmp.status == 0, "\(cmp)")
        if format == "qcow2" {
            let check = try run("qemu-img", "check", dir.file("ours.img"))
            #expect(check.status == 0, "\(check)")
        }
        // Holes where QEMU leaves holes: the same allocation map.
        #expect(try allocationMap(dir.file("ours.img"), format: format) == allocationMap(dir.file("theirs.img"), format: format))
        for (s, b) in zip(sources, before) { #expect(ConvertFixtures.contents(dir.file(s)) == b, "\(s) changed") }
    }

    static let compressedCases: [(String, String)] = [
        ("zlib", "65536"), ("zstd", "65536"), ("zlib", "4096"), ("zstd", "512"), ("zlib", "2M"),
    ]

    @Test(qemuTrait, arguments: compressedCases)
    func compressedOutputReadsBackInQemu(type: String, clusterSize: String) throws {
        let dir = TempDir()
        try ConvertFixtures.all(dir)
        let opts = "compression_type=\(type),cluster_size=\(clusterSize)"
        for src in ["text.raw", "top.qcow2", "random.raw", "odd.raw"] {
            let out = dir.file("c-\(src).qcow2")
            let r = try run("img", ["convert", "-c", "-O", "qcow2", "-o", opts, src, out], cwd: dir.path)
            #expect(r.status == 0, "\(r)")
            let check = try run("qemu-img", "check", "--output=json", out)
            #expect(check.status == 0, "\(check)")
            if src == "text.raw" { #expect(!check.stdout.contains("\"compressed-clusters\": 0"), "\(check.stdout)") }
            // QEMU reads it back byte for byte.
            #expect(try run("qemu-img", "compare", "-F", "qcow2", dir.file(src), out).status == 0)
            try mustRun("qemu-img", "convert", "-O", "raw", out, dir.file("back.raw"))
            try mustRun("qemu-img", "convert", "-O", "raw", dir.file(src), dir.file("expected.raw"))
            #expect(ConvertFixtures.contents(dir.file("back.raw")) == ConvertFixtures.contents(dir.file("expected.raw")))
            // And our reader reads QEMU's compressed image.
            let q = dir.file("q-\(src).qcow2")
            try mustRun("qemu-img", "convert", "-c", "-O", "qcow2", "-o", opts, dir.file(src), q)
            let mine = try run("img", ["convert", "-O", "raw", q, dir.file("mine.raw")], cwd: dir.path)
            #expect(mine.status == 0, "\(mine)")
            #expect(ConvertFixtures.contents(dir.file("mine.raw")) == ConvertFixtures.contents(dir.file("expected.raw")))
        }
    }

    /// The driver API: clusters packed with byte granularity (straddling host clusters),
    /// incompressible ones written normally, refcounts as QEMU counts them.
    @Test(qemuTrait, arguments: [Qcow2CompressionType.zlib, .zstd])
    func writeCompressedClusterDirectly(type: Qcow2CompressionType) async throws {
        let dir = TempDir()
        let path = dir.file("c.qcow2")
        try await ImageCreator.create(format: "qcow2", path: path, size: 64 * 4096 + 1536,
                                      options: [("cluster_size", "4096"), ("compression_type", type.name)])
        let node = try await ImageOpener.open(path, options: OpenOptions(format: "qcow2"))
        let q = try #require(node as? Qcow2Node)
        var expected: [(Int64, [UInt8])] = []
        for i in 0..<64 {
            var data: [UInt8]
            if i % 5 == 3 {
                data = ConvertFixtures.randomBytes(4096, seed: UInt64(i))
            } else {
                // Compressible, with a varying amount of noise so sizes differ.
                data = [UInt8](repeating: UInt8(i), count: 4096)
                let noise = ConvertFixtures.randomBytes(100 + i * 23, seed: UInt64(i))
                for (k, b) in noise.enumerated() { data[(k * 7) % 4096] = b }
            }
            try await writeCompressed(q, Int64(i) * 4096, data)
            expected.append((Int64(i) * 4096, data))
        }
        // The short last cluster (the image size is not cluster-aligned).
        let tail = [UInt8](repeating: 0x5a, count: 1536)
        try await writeCompressed(q, 64 * 4096, tail)
        try await q.finishCompressedWrites()
        try await q.close()
        let check = try run("qemu-img", "check", path)
        #expect(check.status == 0, "\(check)")
        for (off, data) in expected {
            let r = try run("qemu-io", "-f", "qcow2", "-c", "read -v \(off) 16", path)
            let first = data.prefix(16).map { String(format: "%02x", $0) }.joined(separator: " ")
            #expect(r.stdout.contains(first), "cluster at \(off): \(r.stdout)")
        }
        let all = expected.flatMap { $0.1 } + tail
        try mustRun("qemu-img", "convert", "-O", "raw", path, dir.file("back.raw"))
        #expect(ConvertFixtures.contents(dir.file("back.raw")) == Data(all))
        // A compressed write never overwrites.
        let again = try await ImageOpener.open(path, options: OpenOptions(format: "qcow2"))
        let q2 = try #require(again as? Qcow2Node)
        let buf = AlignedBuffer(count: 4096)
        await #expect(throws: BlockError.self) {
            try await buf.withUnsafeBytes { try await q2.writeCompressedCluster(at: 0, data: $0) }
        }
        try await q2.close()
    }

    static let errorCases: [[String]] = [
        ["nope.raw", "out.img"],
        ["-f", "qcow2", "sparse.raw", "out.img"],
        ["-n", "-O", "raw", "sparse.raw", "small.raw"],
        ["-n", "-O", "qcow2", "top.qcow2", "small.raw"],
        ["-c", "sparse.raw", "out.img"],
        ["-O", "foo", "sparse.raw", "out.img"],
        ["--target-is-zero", "sparse.raw", "out.img"],
        ["-S", "100", "sparse.raw", "out.img"],
        ["-m", "0", "sparse.raw", "out.img"],
        ["-m", "17", "sparse.raw", "out.img"],
        ["sparse.raw"],
        ["-O", "qcow2", "-B", "mid.qcow2", "top.qcow2", "out.img"],
        ["-O", "raw", "-B", "mid.qcow2", "-F", "qcow2", "top.qcow2", "out.img"],
        ["-O", "qcow2", "-B", "mid.qcow2", "-F", "qcow2", "top.qcow2", "sparse.raw", "out.img"],
        ["-o", "foo=bar", "sparse.raw", "out.img"],
        ["-O", "qcow2", "-o", "cluster_size=3", "sparse.raw", "out.img"],
        ["-O", "qcow2", "-c", "-o", "preallocation=full", "sparse.raw", "out.img"],
        ["-T", "foo", "sparse.raw", "out.img"],
        ["-n", "sparse.raw", "nope.img"],
        ["-O", "qcow2", "-B", "nope.qcow2", "-F", "qcow2", "top.qcow2", "out.img"],
    ]

    @Test(qemuTrait, arguments: errorCases)
    func errorsMatchQemuAndLeaveInputsAlone(args: [String]) throws {
        let dirs = (TempDir(), TempDir())
        for d in [dirs.0, dirs.1] {
            try ConvertFixtures.all(d)
            try mustRun("qemu-img", "create", "-q", "-f", "raw", d.file("small.raw"), "1M")
        }
        let inputs = ["sparse.raw", "top.qcow2", "mid.qcow2", "base.raw", "small.raw"]
        let before = inputs.map { ConvertFixtures.contents(dirs.0.file($0)) }
        let ours = try run("img", ["convert"] + args, cwd: dirs.0.path)
        let theirs = try run("qemu-img", ["convert"] + args, cwd: dirs.1.path)
        #expect(ours.status == 1)
        #expect(ours.status == theirs.status)
        #expect(ours.stderr == asImg(theirs.stderr))
        #expect(ours.stdout == theirs.stdout)
        for (name, b) in zip(inputs, before) { #expect(ConvertFixtures.contents(dirs.0.file(name)) == b, "\(name) changed") }
    }

    @Test(qemuTrait)
    func progressAsQemuPrintsIt() throws {
        let dir = TempDir()
        let src = dir.file("d.raw")
        try writeFile(src, at: 0, ConvertFixtures.randomBytes(3 << 20, seed: 3))
        let ours = try run("img", "convert", "-p", "-O", "qcow2", src, dir.file("a.qcow2"))
        let theirs = try run("qemu-img", "convert", "-p", "-O", "qcow2", src, dir.file("b.qcow2"))
        #expect(ours.stdout == theirs.stdout)
        let quiet = try run("img", "convert", "-p", "-q", src, dir.file("c.raw"))
        #expect(quiet.stdout.isEmpty)
    }

    @Test(qemuTrait, arguments: [["-n"], ["-n", "--target-is-zero"]])
    func intoExistingTarget(flags: [String]) throws {
        let dir = TempDir()
        try ConvertFixtures.all(dir)
        let target = dir.file("t.qcow2")
        try mustRun("qemu-img", "create", "-q", "-f", "qcow2", target, "4M")
        if !flags.contains("--target-is-zero") {
            // Old content that the conversion must overwrite with the source's zeros and holes.
            try Images.qemuIO(target, format: "qcow2", ["write -P 9 0 4M"])
        }
        let r = try run("img", ["convert"] + flags + ["-O", "qcow2", "top.qcow2", target], cwd: dir.path)
        #expect(r.status == 0, "\(r)")
        let cmp = try run("qemu-img", "compare", dir.file("top.qcow2"), target)
        #expect(cmp.status == 0, "\(cmp)")
        #expect(try run("qemu-img", "check", target).status == 0)
    }

    /// In-order writes give qemu-img's host layout exactly, also while the requests' data
    /// writes overlap: a 24 MiB source of random, zero and hole stripes that do not line up
    /// with the 2 MiB copy chunks, with clusters small enough that L2 tables and refcount
    /// blocks are allocated in the middle of the stream (where QEMU puts a new refcount block
    /// after the run it was allocating), compressed or not.
    @Test(qemuTrait, arguments: [["-o", "cluster_size=4k"], ["-o", "cluster_size=64k"], ["-m", "16", "-o", "cluster_size=16k"],
                                 ["-o", "cluster_size=1k,refcount_bits=64"], ["-c", "-o", "cluster_size=2k"]])
    func inOrderLayoutIsQemuImgs(options: [String]) throws {
        let dir = TempDir()
        let src = dir.file("stripes.raw")
        let size = 24 << 20
        try truncateFile(src, to: Int64(size))
        var pos = 0
        var k: UInt64 = 0
        while pos < size {
            let n = min(1_536 * 1024 + Int(k % 3) * 4096, size - pos)
            switch k % 4 {
            case 0, 1: try writeFile(src, at: Int64(pos), ConvertFixtures.randomBytes(n, seed: k))
            case 2: try writeFile(src, at: Int64(pos), [UInt8](repeating: 0, count: n))
            default: break
            }
            pos += n
            k += 1
        }
        for format in ["raw", "qcow2"] {
            let input = format == "raw" ? src : dir.file("stripes.qcow2")
            if format == "qcow2" { try mustRun("qemu-img", "convert", "-O", "qcow2", src, input) }
            let ours = try run("img", ["convert", "-f", format, "-O", "qcow2"] + options + [input, dir.file("ours.qcow2")])
            #expect(ours.status == 0, "\(ours)")
            let theirs = try run("qemu-img", ["convert", "-f", format, "-O", "qcow2"] + options + [input, dir.file("theirs.qcow2")])
            #expect(theirs.status == 0, "\(theirs)")
            let same = ConvertFixtures.contents(dir.file("ours.qcow2")) == ConvertFixtures.contents(dir.file("theirs.qcow2"))
            #expect(same, "\(format) source, \(options): the output is not byte-identical to qemu-img's")
            #expect(try run("qemu-img", "check", dir.file("ours.qcow2")).status == 0)
        }
    }

    @Test func validation() throws {
        var o = ConvertOptions()
        o.parallelRequests = 17
        #expect(throws: BlockError.self) { try o.validate(sourceCount: 1) }
        o.parallelRequests = 8
        o.minSparse = 4097
        #expect(throws: BlockError.self) { try o.validate(sourceCount: 1) }
        o.minSparse = 0
        try o.validate(sourceCount: 1)
        #expect(throws: BlockError.self) { try o.validate(sourceCount: 0) }
    }
}

/// Writes one cluster compressed through the driver API.
private func writeCompressed(_ q: Qcow2Node, _ offset: Int64, _ data: [UInt8]) async throws {
    let buf = AlignedBuffer(count: data.count)
    buf.withUnsafeMutableBytes { $0.copyBytes(from: data) }
    try await buf.withUnsafeBytes { try await q.writeCompressedCluster(at: offset, data: $0) }
}
