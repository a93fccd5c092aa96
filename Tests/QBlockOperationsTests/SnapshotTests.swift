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

/// qcow2 internal snapshots, with QEMU 7.2's qemu-img/qemu-io as the oracle: snapshots made
/// by either tool are listed, applied and deleted by the other, `qemu-img check` stays clean
/// after every step, and the content is what it should be.
@Suite(qemuTrait) struct SnapshotTests {
    // MARK: Helpers

    func expectClean(_ path: String, _ context: String, sourceLocation: SourceLocation = #_sourceLocation) throws {
        let r = try run("qemu-img", "check", path)
        #expect(r.status == 0 && r.stdout.contains("No errors were found on the image."),
                "qemu-img check after \(context): \(r)", sourceLocation: sourceLocation)
    }

    /// Verifies patterns with qemu-io (`read -P`): each (pattern, offset, length).
    func expectPatterns(_ path: String, _ checks: [(UInt8, Int64, Int64)], _ context: String,
                        sourceLocation: SourceLocation = #_sourceLocation) throws {
        var args: [String] = []
        for (p, o, l) in checks { args += ["-c", "read -P \(p) \(o) \(l)"] }
        let r = try run("qemu-io", args + [path])
        #expect(r.status == 0 && !r.stdout.contains("verification failed") && r.stderr.isEmpty,
                "content after \(context): \(r)", sourceLocation: sourceLocation)
    }

    func bytes(_ path: String) throws -> [UInt8] { try [UInt8](Data(contentsOf: URL(fileURLWithPath: path))) }

    /// The guest content of `path` (or of its snapshot `snapshot`) as qemu-img converts it.
    func qemuContent(_ path: String, snapshot: String? = nil, in dir: TempDir) throws -> [UInt8] {
        let out = dir.file("content-\(UUID().uuidString).raw")
        var args = ["convert", "-O", "raw"]
        if let snapshot { args += ["-l", snapshot] }
        try run("qemu-img", args + [path, out]).expectSuccess()
        return try bytes(out)
    }

    func openQcow2(_ path: String, readOnly: Bool = false) async throws -> Qcow2Node {
        let node = try await ImageOpener.open(path, options: OpenOptions(readOnly: readOnly))
        guard let q = node as? Qcow2Node else { throw BlockError(.internalError, "not qcow2: \(path)") }
        return q
    }

    /// Byte ranges of the date fields (date_sec, date_nsec) of every snapshot table entry.
    func dateRanges(_ image: [UInt8]) -> [Range<Int>] {
        let count = Int(image.be32(60))
        var off = Int(image.be64(64))
        var ranges: [Range<Int>] = []
        for _ in 0..<count {
            off = (off + 7) & ~7
            ranges.append((off + 16)..<(off + 24))
            let idLen = Int(image[off + 12]) << 8 | Int(image[off + 13])
            let nameLen = Int(image[off + 14]) << 8 | Int(image[off + 15])
            off += 40 + Int(image.be32(off + 36)) + idLen + nameLen
        }
        return ranges
    }

    // MARK: Interoperability

    @Test func ourSnapshotsWorkWithQemuImg() throws {
        let dir = TempDir()
        let f = dir.file("a.qcow2")
        try mustRun("qemu-img", "create", "-q", "-f", "qcow2", f, "64M")
        try mustRun("qemu-io", "-c", "write -P 0xaa 0 1M", "-c", "write -P 0x11 32M 64k", f)
        try mustRun("img", "snapshot", "-c", "s1", f)
        try expectClean(f, "img snapshot -c")
        let ql = try run("qemu-img", "snapshot", "-l", f)
        let ol = try run("img", "snapshot", "-l", f)
        #expect(ql.stdout == ol.stdout && ql.stdout.hasPrefix("Snapshot list:\n"), "\(ql)\n\(ol)")
        // Writes after the snapshot copy the shared clusters and L2 table.
        try mustRun("qemu-io", "-c", "write -P 0xbb 0 512k", f)
        try expectClean(f, "write after snapshot")
        try expectPatterns(f, [(0xbb, 0, 512 << 10), (0xaa, 512 << 10, 512 << 10), (0x11, 32 << 20, 64 << 10)], "write after snapshot")
        #expect(try qemuContent(f, snapshot: "s1", in: dir).prefix(1 << 20).allSatisfy { $0 == 0xaa })
        try mustRun("qemu-img", "snapshot", "-a", "s1", f)
        try expectClean(f, "qemu-img snapshot -a of our snapshot")
        try expectPatterns(f, [(0xaa, 0, 1 << 20), (0x11, 32 << 20, 64 << 10)], "qemu-img snapshot -a")
        try mustRun("qemu-io", "-c", "write -P 0xcc 0 64k", f)
        try mustRun("img", "snapshot", "-c", "s2", f)
        try mustRun("qemu-img", "snapshot", "-d", "s1", f)
        try expectClean(f, "qemu-img snapshot -d of our snapshot")
        try expectPatterns(f, [(0xcc, 0, 64 << 10), (0xaa, 64 << 10, 960 << 10)], "after delete")
        try mustRun("qemu-io", "-c", "write -P 0xdd 64k 64k", f)
        try mustRun("qemu-img", "snapshot", "-a", "s2", f)
        try expectPatterns(f, [(0xcc, 0, 64 << 10), (0xaa, 64 << 10, 960 << 10)], "apply s2")
        try mustRun("qemu-img", "snapshot", "-d", "s2", f)
        try expectClean(f, "last snapshot deleted")
        #expect(try run("qemu-img", "snapshot", "-l", f).stdout == "")
    }

    @Test func qemuSnapshotsWorkWithOurs() throws {
        let dir = TempDir()
        let f = dir.file("a.qcow2")
        try mustRun("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", f, "16M")
        try mustRun("qemu-io", "-c", "write -P 0x21 0 3M", "-c", "write -P 0x22 15M 4097", f)
        try mustRun("qemu-img", "snapshot", "-c", "first", f)
        try mustRun("qemu-io", "-c", "write -P 0x31 1M 8k", "-c", "write -z 2M 1M", f)
        try mustRun("qemu-img", "snapshot", "-c", "second", f)
        let ql = try run("qemu-img", "snapshot", "-l", f)
        #expect(try run("img", "snapshot", "-l", f).stdout == ql.stdout)
        try mustRun("img", "snapshot", "-a", "first", f)
        try expectClean(f, "img snapshot -a of qemu's snapshot")
        try expectPatterns(f, [(0x21, 0, 3 << 20), (0x22, 15 << 20, 4097)], "img snapshot -a first")
        try mustRun("img", "snapshot", "-d", "first", f)
        try expectClean(f, "img snapshot -d of qemu's snapshot")
        try expectPatterns(f, [(0x21, 0, 3 << 20)], "after deleting first")
        try mustRun("img", "snapshot", "-a", "2", f)
        try expectPatterns(f, [(0x21, 0, 1 << 20), (0x31, 1 << 20, 8192), (0x21, (1 << 20) + 8192, (1 << 20) - 8192),
                               (0, 2 << 20, 1 << 20)], "img snapshot -a 2 (by id)")
        try mustRun("img", "snapshot", "-d", "second", f)
        try expectClean(f, "all deleted")
        let raw = try bytes(f)
        #expect(raw.be32(60) == 0 && raw.be64(64) == 0, "header: nb_snapshots and snapshots_offset are zero again")
    }

    static let layouts: [[String]] = [
        ["-o", "cluster_size=65536"], ["-o", "cluster_size=4096"], ["-o", "compat=0.10"],
        ["-o", "refcount_bits=8,cluster_size=16384"], ["-o", "cluster_size=2M"],
    ]

    /// The same sequence of writes and snapshot operations done by qemu-img and by img gives
    /// the same file, byte for byte, apart from the snapshot dates.
    @Test(arguments: layouts)
    func sameBytesAsQemuImg(options: [String]) throws {
        let dir = TempDir()
        let paths = [dir.file("q.qcow2"), dir.file("o.qcow2")]
        for (tool, f) in zip(["qemu-img", "img"], paths) {
            try run("qemu-img", ["create", "-q", "-f", "qcow2"] + options + [f, "64M"]).expectSuccess()
            try mustRun("qemu-io", "-c", "write -P 0xaa 0 1M", "-c", "write -P 0x11 32M 64k", f)
            try mustRun(tool, "snapshot", "-c", "s1", f)
            try mustRun("qemu-io", "-c", "write -P 0xbb 4k 512k", f)
            try mustRun(tool, "snapshot", "-c", "s2", f)
            try mustRun(tool, "snapshot", "-a", "s1", f)
            try mustRun("qemu-io", "-c", "write -P 0xcc 128k 64k", "-c", "write -P 0xdd 40M 64k", f)
            try mustRun(tool, "snapshot", "-d", "s2", f)
            try mustRun(tool, "snapshot", "-c", "s3", f)
            try mustRun(tool, "snapshot", "-a", "1", f)
            try expectClean(f, "\(tool) sequence \(options)")
        }
        let q = try bytes(paths[0]), o = try bytes(paths[1])
        #expect(q.count == o.count, "file lengths \(q.count) vs \(o.count)")
        let dates = dateRanges(q)
        #expect(dates.count == 2)
        var differing: [Int] = []
        for i in 0..<min(q.count, o.count) where q[i] != o[i] && !dates.contains(where: { $0.contains(i) }) {
            differing.append(i)
            if differing.count > 10 { break }
        }
        #expect(differing.isEmpty, "bytes differ outside the snapshot dates at \(differing) (\(options))")
        // Freed clusters are punched out of the host file by both tools. st_blocks also counts
        // the file system's own block preallocation, which varies by a block or two with timing,
        // so allow that much slack.
        let qb = fileStat(paths[0])?.blocks ?? 0, ob = fileStat(paths[1])?.blocks ?? 0
        #expect(abs(Int(qb) - Int(ob)) <= 16, "allocated blocks (discarded clusters) differ: \(qb) vs \(ob)")
    }

    @Test func compressedClustersAndBackingFile() throws {
        let dir = TempDir()
        let base = dir.file("base.raw"), src = dir.file("src.raw"), top = dir.file("top.qcow2")
        try mustRun("qemu-img", "create", "-q", "-f", "raw", base, "8M")
        try mustRun("qemu-io", "-f", "raw", "-c", "write -P 0x42 0 8M", base)
        try mustRun("qemu-img", "create", "-q", "-f", "raw", src, "8M")
        try mustRun("qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 2M", "-c", "write -P 0x33 5M 100k", src)
        // A compressed image on a backing file, then snapshots over it.
        try mustRun("qemu-img", "convert", "-q", "-c", "-O", "qcow2", "-o", "cluster_size=4096", "-B", base, "-F", "raw", src, top)
        let before = try qemuContent(top, in: dir)
        try mustRun("img", "snapshot", "-c", "c1", top)
        try expectClean(top, "snapshot of compressed clusters")
        try mustRun("qemu-io", "-c", "write -P 0x77 4k 8k", "-c", "write -P 0x78 1M 4k", "-c", "write -P 0x79 7M 4k", top)
        let middle = try qemuContent(top, in: dir)
        try mustRun("img", "snapshot", "-c", "c2", top)
        try mustRun("img", "snapshot", "-a", "c1", top)
        try expectClean(top, "apply over compressed clusters")
        #expect(try qemuContent(top, in: dir) == before)
        try mustRun("img", "snapshot", "-d", "c1", top)
        try expectClean(top, "delete c1")
        #expect(try qemuContent(top, in: dir) == before)
        #expect(try qemuContent(top, snapshot: "c2", in: dir) == middle)
        try mustRun("img", "snapshot", "-d", "c2", top)
        try expectClean(top, "delete c2")
        #expect(try qemuContent(top, in: dir) == before)
    }

    @Test func applyRestoresTheSnapshotsDiskSize() throws {
        let dir = TempDir()
        let f = dir.file("z.qcow2")
        try mustRun("qemu-img", "create", "-q", "-f", "qcow2", f, "1M")
        try mustRun("qemu-io", "-c", "write -P 1 0 1M", f)
        try mustRun("img", "snapshot", "-c", "small", f)
        try mustRun("qemu-img", "resize", "-q", f, "300M")
        try mustRun("qemu-io", "-c", "write -P 2 0 64k", "-c", "write -P 3 299M 1M", f)
        try mustRun("img", "snapshot", "-c", "big", f)
        try mustRun("img", "snapshot", "-a", "small", f)
        try expectClean(f, "apply smaller snapshot")
        #expect(try run("qemu-img", "info", f).stdout.contains("virtual size: 1 MiB (1048576 bytes)"))
        try expectPatterns(f, [(1, 0, 1 << 20)], "apply smaller snapshot")
        try mustRun("img", "snapshot", "-a", "big", f)
        #expect(try run("qemu-img", "info", f).stdout.contains("virtual size: 300 MiB (314572800 bytes)"))
        try expectPatterns(f, [(2, 0, 64 << 10), (1, 64 << 10, 960 << 10), (3, 299 << 20, 1 << 20)], "apply larger snapshot")
        try expectClean(f, "apply larger snapshot")
    }

    // MARK: Library API

    @Test func writesAfterASnapshotLeaveItUnchanged() async throws {
        let dir = TempDir()
        let f = dir.file("a.qcow2")
        try mustRun("qemu-img", "create", "-q", "-f", "qcow2", f, "8M")
        let size = 8 << 20
        var a = [UInt8](repeating: 0, count: size)
        for i in 0..<(3 << 20) { a[i] = UInt8(truncatingIfNeeded: i % 251 + 1) }
        var node = try await openQcow2(f)
        try await write(node, at: 0, Array(a[0..<(3 << 20)]))
        let sn = try await node.createSnapshot(name: "a")
        #expect(sn.id == "1" && sn.name == "a" && sn.diskSize == UInt64(size) && sn.icount == 0 && sn.vmStateSize == 0)
        #expect(node.snapshots() == [sn])
        // Partial clusters, a whole L2 table's worth of clusters, and an unallocated area.
        var b = a
        let writes: [(Int, Int, UInt8)] = [(100_000, 200_000, 0xb1), (2 << 20 + 5, 10, 0xb2), (6 << 20, 65536, 0xb3)]
        for (o, l, p) in writes {
            try await write(node, at: Int64(o), [UInt8](repeating: p, count: l))
            b.replaceSubrange(o..<(o + l), with: [UInt8](repeating: p, count: l))
        }
        let view = try await node.snapshotReader(idOrName: "a")
        #expect(view.length == Int64(size))
        #expect(try await read(view, at: 0, count: size) == a, "the snapshot view shows the content at snapshot time")
        #expect(try await read(node, at: 0, count: size) == b)
        let st = try await view.blockStatus(at: 4 << 20, length: 1 << 20)
        #expect(st.flags.contains(.zero) && !st.flags.contains(.allocated))
        await #expect(throws: BlockError.self) { try await write(view, at: 0, [1]) }
        try await node.close()
        try expectClean(f, "writes after a snapshot")
        #expect(try qemuContent(f, snapshot: "a", in: dir) == a)
        #expect(try qemuContent(f, in: dir) == b)

        node = try await openQcow2(f)
        #expect(node.snapshots().map(\.name) == ["a"], "the table is read back at open")
        try await node.applySnapshot(idOrName: "a")
        #expect(try await read(node, at: 0, count: size) == a)
        try await node.deleteSnapshot(idOrName: "1")
        #expect(node.snapshots().isEmpty)
        try await write(node, at: 0, [UInt8](repeating: 0xee, count: 4096))
        try await node.close()
        try expectClean(f, "apply, delete and write through the library")
        a.replaceSubrange(0..<4096, with: [UInt8](repeating: 0xee, count: 4096))
        #expect(try qemuContent(f, in: dir) == a)
    }

    @Test func snapshotReaderMatchesQemuImgConvertL() async throws {
        let dir = TempDir()
        let f = dir.file("a.qcow2")
        try mustRun("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", f, "4M")
        try mustRun("qemu-io", "-c", "write -P 0x61 0 1M", f)
        try mustRun("qemu-img", "snapshot", "-c", "one", f)
        try mustRun("qemu-io", "-c", "write -P 0x62 512k 1M", f)
        try mustRun("qemu-img", "snapshot", "-c", "two", f)
        try mustRun("qemu-io", "-c", "write -z 0 2M", f)
        let node = try await openQcow2(f, readOnly: true)
        for name in ["one", "two", "1", "2"] {
            let view = try await node.snapshotReader(idOrName: name)
            let expected = try qemuContent(f, snapshot: name, in: dir)
            #expect(try await read(view, at: 0, count: Int(view.length)) == expected, "snapshot \(name)")
        }
        let both = try await node.snapshotReader(id: "2", name: "two")
        #expect(both.snapshot.name == "two")
        await #expect(throws: BlockError.self) { _ = try await node.snapshotReader(id: "1", name: "two") }
        await #expect(throws: BlockError.self) { _ = try await node.snapshotReader(idOrName: "three") }
        try await node.close()
    }

    // MARK: img info

    @Test func infoListsSnapshotsLikeQemuImg() throws {
        let dir = TempDir()
        let f = dir.file("a.qcow2")
        try mustRun("qemu-img", "create", "-q", "-f", "qcow2", f, "16M")
        try mustRun("qemu-io", "-c", "write -P 1 0 1M", f)
        try mustRun("img", "snapshot", "-c", "ours", f)
        try mustRun("qemu-img", "snapshot", "-c", "theirs with spaces and a long name", f)
        for args in [["info", f], ["info", "--output=json", f], ["snapshot", "-l", f], ["snapshot", "-l", "-U", f]] {
            let q = try run("qemu-img", args), o = try run("img", args)
            #expect(o.stdout == q.stdout && o.status == q.status, "\(args): \(o.stdout) vs \(q.stdout)")
        }
        let json = try run("img", "info", "--output=json", f).stdout
        #expect(json.contains("\"snapshots\": ["))
        // An image without snapshots has no list at all.
        let e = dir.file("e.qcow2")
        try mustRun("qemu-img", "create", "-q", "-f", "qcow2", e, "1M")
        for args in [["info", "--output=json", e], ["snapshot", "-l", e]] {
            #expect(try run("img", args).stdout == (try run("qemu-img", args).stdout))
        }
    }

    // MARK: Bad input

    static let badInvocations: [[String]] = [
        ["snapshot", "-a", "nope", "a.qcow2"], ["snapshot", "-d", "nope", "a.qcow2"],
        ["snapshot", "-c", "a", "-d", "b", "a.qcow2"], ["snapshot", "-c", "x"], ["snapshot", "-l", "a.qcow2", "b"],
        ["snapshot", "-U", "-c", "x", "a.qcow2"], ["snapshot", "-l", "missing.qcow2"],
        ["snapshot", "-c", "x", "r.raw"], ["snapshot", "-a", "x", "r.raw"], ["snapshot", "-d", "x", "r.raw"],
        ["snapshot", "-l", "r.raw"], ["snapshot", "a.qcow2"], ["snapshot", "-d", "1", "a.qcow2"],
    ]

    @Test(arguments: badInvocations)
    func badInputFailsLikeQemuImgAndChangesNothing(args: [String]) throws {
        let (ours, _) = try expectSameAsQemu(args) { d in
            try mustRun("qemu-img", "create", "-q", "-f", "qcow2", d.file("a.qcow2"), "1M")
            try mustRun("qemu-io", "-c", "write -P 7 0 64k", d.file("a.qcow2"))
            try mustRun("qemu-img", "snapshot", "-c", "s", d.file("a.qcow2"))
            try mustRun("qemu-img", "create", "-q", "-f", "raw", d.file("r.raw"), "1M")
        }
        // (Re-running on our copy must leave the bytes alone.)
        let before = try bytes(ours.file("a.qcow2"))
        _ = try run("img", args, cwd: ours.path)
        #expect(try bytes(ours.file("a.qcow2")) == before, "\(args) changed the image")
    }

    @Test func readOnlyImagesRefuseSnapshotChanges() async throws {
        let dir = TempDir()
        let f = dir.file("a.qcow2")
        try mustRun("qemu-img", "create", "-q", "-f", "qcow2", f, "1M")
        try mustRun("qemu-io", "-c", "write -P 7 0 64k", f)
        try mustRun("qemu-img", "snapshot", "-c", "s", f)
        let before = try bytes(f)
        let node = try await openQcow2(f, readOnly: true)
        for op in ["create", "apply", "delete"] {
            do {
                switch op {
                case "create": try await node.createSnapshot(name: "x")
                case "apply": try await node.applySnapshot(idOrName: "s")
                default: try await node.deleteSnapshot(idOrName: "s")
                }
                Issue.record("\(op) on a read-only node succeeded")
            } catch let e as BlockError {
                #expect(e.code == .readOnly, "\(op): \(e)")
            }
        }
        await #expect(throws: BlockError.self) { try await node.applySnapshot(idOrName: "absent") }
        try await node.close()
        #expect(try bytes(f) == before)
        // Absent names through the library: a clear error, nothing written.
        let rw = try await openQcow2(f)
        do {
            try await rw.applySnapshot(idOrName: "absent")
            Issue.record("apply of an absent snapshot succeeded")
        } catch let e as BlockError {
            #expect(e.code == .notFound && e.message == "Failed to load snapshot: No such file or directory")
        }
        do {
            try await rw.deleteSnapshot(idOrName: "absent")
            Issue.record("delete of an absent snapshot succeeded")
        } catch let e as BlockError {
            #expect(e.code == .notFound && e.message == "snapshot not found")
        }
        try await rw.close()
        #expect(try bytes(f) == before)
    }

    @Test func refcountWidthTooSmallFailsLikeQemu() throws {
        let (ours, theirs) = try expectSameAsQemu(["snapshot", "-c", "x", "a.qcow2"]) { d in
            try mustRun("qemu-img", "create", "-q", "-f", "qcow2", "-o", "refcount_bits=1", d.file("a.qcow2"), "1M")
            try mustRun("qemu-io", "-c", "write 0 64k", d.file("a.qcow2"))
        }
        // Both leave the same bytes (QEMU leaks the snapshot's L1 cluster too).
        #expect(try bytes(ours.file("a.qcow2")) == (try bytes(theirs.file("a.qcow2"))))
    }
}

extension RunResult {
    func expectSuccess(sourceLocation: SourceLocation = #_sourceLocation) throws {
        #expect(status == 0, "\(self)", sourceLocation: sourceLocation)
    }
}

/// Simulated crashes: every write to the image after the k-th fails (as if the process died
/// there), for every k through a snapshot operation. Whatever was written must leave an image
/// where no refcount is below its references (leaks and, as with QEMU, COPIED flags that
/// `check -r all` corrects are the worst), with the content of the state before or after.
@Suite(qemuTrait, .serialized) struct SnapshotCrashTests {
    // @unchecked Sendable: `allowed` and `writes` are only touched with `lock` held.
    final class Killer: @unchecked Sendable {
        let lock = PosixMutex()
        var allowed = Int.max
        var writes = 0
    }

    enum Op: String, CaseIterable { case create, apply, delete }

    /// Runs `op` on a fresh copy of the fixture, killing it after `allowed` writes; returns
    /// the writes the operation made. The process "dies" then: the file is closed under the
    /// image, whose caches are never written back; qemu-img reads with -U.
    func attempt(_ op: Op, fixture: String, copy: String, allowed: Int) async throws -> Int {
        try? FileManager.default.removeItem(atPath: copy)
        try FileManager.default.copyItem(atPath: fixture, toPath: copy)
        let node = try await ImageOpener.open(copy, options: OpenOptions())
        guard let q = node as? Qcow2Node else { throw BlockError(.internalError, "not qcow2") }
        let k = Killer()
        k.allowed = allowed
        try await Syscalls.withInjector(path: copy, { call, _ in
            k.lock.withLock {
                switch call {
                case .pwrite, .fallocate, .ftruncate:
                    if k.writes >= k.allowed { return EIO }
                    k.writes += 1
                    return nil
                case .fsync: return k.writes >= k.allowed ? EIO : nil
                case .pread: return nil
                }
            }
        }) {
            do {
                switch op {
                case .create: try await q.createSnapshot(name: "new")
                case .apply: try await q.applySnapshot(idOrName: "old")
                case .delete: try await q.deleteSnapshot(idOrName: "old")
                }
            } catch {}
            try await q.hostFile.close()
        }
        return k.lock.withLock { k.writes }
    }

    @Test(arguments: Op.allCases)
    func crashAnywhereLeavesAtWorstLeaks(op: Op) async throws {
        let dir = TempDir()
        let fixture = dir.file("fixture.qcow2")
        try mustRun("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", fixture, "4M")
        try mustRun("qemu-io", "-c", "write -P 0x11 0 1M", "-c", "write -P 0x12 3M 8k", fixture)
        try mustRun("qemu-img", "snapshot", "-c", "old", fixture)
        try mustRun("qemu-io", "-c", "write -P 0x21 512k 1M", "-c", "write -z 3M 4k", fixture)
        let current = try SnapshotTests().qemuContent(fixture, in: dir)
        let old = try SnapshotTests().qemuContent(fixture, snapshot: "old", in: dir)
        let copy = dir.file("crash.qcow2")
        let total = try await attempt(op, fixture: fixture, copy: copy, allowed: Int.max)
        #expect(total > 3, "the operation writes")
        // At most ~30 crash points, spread over the whole operation (and its very end).
        let points = Array(stride(from: 0, to: total, by: max(1, total / 30))) + [total]
        for allowed in points {
            _ = try await attempt(op, fixture: fixture, copy: copy, allowed: allowed)
            let r = try run("qemu-img", "check", "-U", copy)
            let bad = (r.stdout + r.stderr).split(separator: "\n").filter { $0.hasPrefix("ERROR") && !$0.contains("OFLAG_COPIED") }
            #expect(bad.isEmpty, "\(op) killed after \(allowed) of \(total) writes: \(r)")
            let out = dir.file("content.raw")
            try? FileManager.default.removeItem(atPath: out)
            try run("qemu-img", "convert", "-U", "-O", "raw", copy, out).expectSuccess()
            let content = try [UInt8](Data(contentsOf: URL(fileURLWithPath: out)))
            let acceptable = op == .apply ? [current, old] : [current]
            #expect(acceptable.contains(content), "\(op) killed after \(allowed) of \(total) writes: active content")
            let list = try run("qemu-img", "snapshot", "-U", "-l", copy).stdout
            #expect(list.contains(" old ") || op == .delete, "\(op) killed after \(allowed): snapshot list \(list)")
        }
    }
}
