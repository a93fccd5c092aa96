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



/// Runs `img map` and `qemu-img map` with the same arguments in `dir` and expects the same
/// output, error text and exit status.
func expectSameMap(_ args: [String], in dir: String, sourceLocation: SourceLocation = #_sourceLocation) throws {
    let ours = try run("img", ["map"] + args, cwd: dir)
    let theirs = try run("qemu-img", ["map"] + args, cwd: dir)
    #expect(ours.stdout == theirs.stdout, "img map \(args.joined(separator: " "))", sourceLocation: sourceLocation)
    #expect(ours.stderr == asImg(theirs.stderr), sourceLocation: sourceLocation)
    #expect(ours.status == theirs.status, sourceLocation: sourceLocation)
}

@Suite struct MapTests {
    @Test func entriesOfSparseRaw() async throws {
        let dir = TempDir()
        let path = try Images.sparseRaw(dir)
        let node = try await ImageOpener.open(path, options: OpenOptions(format: "raw", readOnly: true))
        let entries = try await BlockMap.entries(of: node)
        try await node.close()
        #expect(entries.first == MapEntry(start: 0, length: 65536, depth: 0, present: true, zero: true, data: false,
                                          offset: 0, filename: path))
        #expect(entries.contains { $0.start == 65536 && $0.length == 65536 && $0.data && !$0.zero && $0.offset == 65536 })
        #expect(entries.map(\.length).reduce(0, +) == 4 << 20)
        // Adjacent entries never merge.
        for (a, b) in zip(entries, entries.dropFirst()) { #expect(!a.mergeable(with: b)) }
    }

    @Test func qdictOrderMatchesQemu() {
        // Bucket order of QEMU's QDict, as observed in qemu-img info output.
        let keys = ["virtual-size", "filename", "cluster-size", "format", "actual-size", "format-specific",
                    "full-backing-filename", "backing-filename", "backing-filename-format", "dirty-flag"]
        let d = QObject.Dict(keys.map { ($0, QObject.int(0)) })
        #expect(d.qemuOrdered.map(\.key) == ["backing-filename-format", "virtual-size", "filename", "cluster-size", "format",
                                             "actual-size", "format-specific", "full-backing-filename", "backing-filename",
                                             "dirty-flag"])
        #expect(QObject.quote("a\"b\\c\n\u{1}é") == "\"a\\\"b\\\\c\\n\\u0001\\u00E9\"")
    }

    @Test(qemuTrait, arguments: [
        [String](), ["--start-offset=100k", "--max-length=1M"], ["--start-offset=5M"], ["--start-offset", "64k"],
        ["--max-length=0"], ["--start-offset=1000", "--max-length=10"], ["--max-length=1k"],
    ])
    func rawMapMatchesQemu(extra: [String]) throws {
        let dir = TempDir()
        _ = try Images.sparseRaw(dir)
        try expectSameMap(["--output=json", "sparse.raw"] + extra, in: dir.path)
        try expectSameMap(["-f", "raw", "sparse.raw"] + extra, in: dir.path)
    }

    @Test(qemuTrait, arguments: [Int64(0), 1, 1000, 4096, 70000, 1 << 20])
    func rawMapOfOddSizesMatchesQemu(dataBytes: Int64) throws {
        let dir = TempDir()
        let path = dir.file("odd.raw")
        if dataBytes > 0 { try writeFile(path, at: 0, [UInt8](repeating: 9, count: Int(dataBytes))) }
        try truncateFile(path, to: dataBytes + 3000)
        try expectSameMap(["--output=json", "odd.raw"], in: dir.path)
        try expectSameMap(["odd.raw"], in: dir.path)
        try mustRun("qemu-img", "create", "-q", "-f", "raw", "-o", "preallocation=full", dir.file("full.raw"), "1M")
        try expectSameMap(["--output=json", "full.raw"], in: dir.path)
    }

    @Test(qemuTrait) func mapErrorsMatchQemu() throws {
        let dir = TempDir()
        _ = try Images.sparseRaw(dir)
        try expectSameMap(["--output=xml", "sparse.raw"], in: dir.path)
        try expectSameMap(["--start-offset=1x", "sparse.raw"], in: dir.path)
        try expectSameMap(["nonexistent.raw"], in: dir.path)
    }

    // MARK: qcow2 (needs the real qcow2 driver)

    @Test(qemuTrait, arguments: [65536, 4096, 2 << 20])
    func qcow2ChainMapMatchesQemu(clusterSize: Int) throws {
        let dir = TempDir()
        _ = try Images.qcow2Chain(dir, clusterSize: clusterSize)
        for image in ["mid.qcow2", "top.qcow2"] {
            try expectSameMap(["--output=json", image], in: dir.path)
            // Compressed clusters make the human format stop with an error, as qemu-img does.
            try expectSameMap([image], in: dir.path)
            try expectSameMap(["--output=json", "--start-offset=96k", "--max-length=3M", image], in: dir.path)
        }
    }

    @Test(qemuTrait) func qcow2WithoutBackingMapMatchesQemu() throws {
        let dir = TempDir()
        let path = dir.file("plain.qcow2")
        try mustRun("qemu-img", "create", "-q", "-f", "qcow2", path, "16M")
        try Images.qemuIO(path, format: "qcow2", ["write -P 1 0 128k", "write -z 1M 1M", "write -P 2 8M 4k",
                                                  "discard 8M 64k", "write -P 3 15M 1M"])
        try expectSameMap(["--output=json", "plain.qcow2"], in: dir.path)
        try expectSameMap(["plain.qcow2"], in: dir.path)
        try mustRun("qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", dir.file("pm.qcow2"), "4M")
        try expectSameMap(["--output=json", "pm.qcow2"], in: dir.path)
    }
}
