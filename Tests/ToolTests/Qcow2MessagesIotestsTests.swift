import Foundation
import Testing
import QBlock
import TestSupport

/// The lines the qcow2 driver prints on stderr as it works (``BlockNotices``), compared with
/// qemu-io's and qemu-img's: the corruption notice (iotest 305), the repair of an image
/// opened dirty read-write (039), a failed cluster free during snapshot deletion and the
/// `-r leaks` repair of the COPIED flags that follows it (217).
@Suite struct Qcow2MessagesIotestsTests {
    /// Writes `bytes` at `offset` of the file at `path`.
    private func poke(_ path: String, _ offset: UInt64, _ bytes: [UInt8]) throws {
        let h = try #require(FileHandle(forUpdatingAtPath: path))
        defer { try? h.close() }
        try h.seek(toOffset: offset)
        try h.write(contentsOf: Data(bytes))
    }

    /// The big-endian 64-bit value at `offset` of the file at `path`.
    private func peek64(_ path: String, _ offset: Int) throws -> UInt64 {
        let d = try Data(contentsOf: URL(fileURLWithPath: path))
        return d[offset..<offset + 8].reduce(0) { $0 << 8 | UInt64($1) }
    }

    /// `text` without qemu-io's timing lines and with `path` replaced.
    private func filtered(_ text: String, _ path: String) -> String {
        text.split(separator: "\n", omittingEmptySubsequences: false)
            .filter { !$0.contains(" ops; ") }
            .joined(separator: "\n")
            .replacingOccurrences(of: path, with: "IMAGE")
    }

    @Test(qemuTrait)
    func corruptionNoticeAsQemuIO() throws {
        let dir = TempDir()
        var results: [RunResult] = []
        for (io, img) in [("io", "img"), ("qemu-io", "qemu-img")] {
            let image = dir.file("\(io).qcow2")
            try mustRun(img, "create", "-q", "-f", "qcow2", "-o", "refcount_bits=64,cluster_size=1k", image, "1M")
            try mustRun(io, "-c", "write 0 124k", image)
            try mustRun(io, "-c", "discard 121k 1k", image)
            try mustRun(io, "-c", "discard 123k 1k", image)
            let reftable = try peek64(image, 48)
            try poke(image, reftable + 14, [0x06])
            var r = try run(io, "-c", "write 121k 3k", image)
            r.stdout = filtered(r.stdout, image)
            r.stderr = filtered(r.stderr, image)
            results.append(r)
        }
        #expect(results[0].stderr == "qcow2: Marking image as corrupt: Refblock offset 0x20600 unaligned (reftable index: 0x1); further corruption events will be suppressed\n")
        #expect(results[0].stdout == results[1].stdout && results[0].stderr == results[1].stderr,
                "ours: \(results[0])\nqemu: \(results[1])")
    }

    @Test(qemuTrait)
    func repairOfDirtyImageOpenedReadWriteAsQemuIO() throws {
        let dir = TempDir()
        var results: [RunResult] = []
        for (io, img) in [("io", "img"), ("qemu-io", "qemu-img")] {
            let image = dir.file("\(io).qcow2")
            try mustRun(img, "create", "-q", "-f", "qcow2", "-o", "compat=1.1,lazy_refcounts=on", image, "128M")
            // Killed with the image dirty: refcounts unwritten.
            _ = try run(io, "-c", "write -P 0x5a 0 512", "-c", "sigraise 9", image)
            var r = try run(io, "-c", "write 0 512", image)
            r.stdout = filtered(r.stdout, image)
            results.append(r)
            let check = try run(img, "check", image)
            #expect(check.status == 0, "\(io): \(check)")
        }
        #expect(results[0].stderr.contains("Rebuilding refcount structure\n"))
        #expect(results[0].stdout == results[1].stdout && results[0].stderr == results[1].stderr,
                "ours: \(results[0])\nqemu: \(results[1])")
    }

    @Test(qemuTrait)
    func failedFreeDuringSnapshotDeletionAsQemuImg() throws {
        let dir = TempDir()
        let conf = dir.file("blkdebug.conf")
        try "[inject-error]\nevent = \"cluster_free\"\nerrno = \"5\"\n".write(toFile: conf, atomically: true, encoding: .utf8)
        var results: [[RunResult]] = []
        for (io, img) in [("io", "img"), ("qemu-io", "qemu-img")] {
            let image = dir.file("\(io).qcow2")
            try mustRun(img, "create", "-q", "-f", "qcow2", image, "64M")
            try mustRun(io, "-c", "write 0 64k", image)
            try mustRun(img, "snapshot", "-c", "foo", image)
            var steps: [RunResult] = []
            steps.append(try run(img, "snapshot", "-d", "foo", "blkdebug:\(conf):\(image)"))
            steps.append(try run(img, "check", image))
            steps.append(try run(img, "check", "-r", "leaks", image))
            steps.append(try run(img, "check", image))
            results.append(steps.map {
                var r = $0
                r.stdout = r.stdout.replacingOccurrences(of: image, with: "IMAGE")
                r.stderr = r.stderr.replacingOccurrences(of: image, with: "IMAGE").replacingOccurrences(of: "qemu-img:", with: "img:")
                return r
            })
        }
        #expect(results[0][0].stderr.hasPrefix("qcow2_free_clusters failed: Input/output error\n"))
        #expect(results[0][2].stdout.contains("    2 corruptions\n"))
        for (ours, theirs) in zip(results[0], results[1]) {
            #expect(ours.status == theirs.status && ours.stdout == theirs.stdout && ours.stderr == theirs.stderr,
                    "ours: \(ours)\nqemu: \(theirs)")
        }
    }

    /// iotest 098: `img commit` empties the top image as QEMU's make_completely_empty, so an
    /// error injected at each of its steps leaves the same image (the next read-write open
    /// repairs it with the same lines), and a commit that succeeds leaves the same file (the
    /// two events after which the open rebuilds the refcounts leave a larger file here: the
    /// rebuilt structure is placed after the end of the image).
    @Test(qemuTrait, arguments: ["l1_update", "empty_image_prepare", "reftable_update", "refblock_alloc", "none"])
    func interruptedCommitEmptiesAsQemuImg(event: String) throws {
        let dir = TempDir()
        let conf = dir.file("blkdebug.conf")
        try "[inject-error]\nevent = \"\(event)\"\n".write(toFile: conf, atomically: true, encoding: .utf8)
        var results: [[RunResult]] = []
        var sizes: [UInt64] = []
        for (io, img) in [("io", "img"), ("qemu-io", "qemu-img")] {
            let base = dir.file("\(io).base.qcow2")
            let top = dir.file("\(io).qcow2")
            try mustRun(img, "create", "-q", "-f", "qcow2", base, "64M")
            try mustRun(img, "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top, "64M")
            try mustRun(io, "-c", "write 0 64k", top)
            var steps: [RunResult] = []
            steps.append(try run(img, "commit", event == "none" ? top : "blkdebug:\(conf):\(top)"))
            steps.append(try run(io, "-c", "close", top))
            steps.append(try run(img, "check", top))
            results.append(steps.map {
                var r = $0
                for (path, name) in [(conf, "CONF"), (top, "TOP")] {
                    r.stdout = r.stdout.replacingOccurrences(of: path, with: name)
                    r.stderr = r.stderr.replacingOccurrences(of: path, with: name)
                }
                r.stderr = r.stderr.replacingOccurrences(of: "qemu-img:", with: "img:")
                // A rebuilt refcount structure goes after the end of the image here, into the
                // first free clusters in QEMU (the iotest filters this line too).
                r.stdout = r.stdout.split(separator: "\n", omittingEmptySubsequences: false)
                    .filter { !$0.hasPrefix("Image end offset: ") }.joined(separator: "\n")
                return r
            })
            let attrs = try FileManager.default.attributesOfItem(atPath: top)
            sizes.append((attrs[.size] as? NSNumber)?.uint64Value ?? 0)
        }
        for (ours, theirs) in zip(results[0], results[1]) {
            #expect(ours.status == theirs.status && ours.stdout == theirs.stdout && ours.stderr == theirs.stderr,
                    "\(event): ours: \(ours)\nqemu: \(theirs)")
        }
        if !["reftable_update", "refblock_alloc"].contains(event) {
            #expect(sizes[0] == sizes[1], "\(event): file sizes \(sizes)")
        }
    }

    /// iotest 241's middle case: a raw image whose format the server probed is exported with
    /// QEMU's 512-byte alignment of a probed raw node, so `--list` shows "min block: 512" and a
    /// client maps the unaligned 1000-byte file as one 1 KiB run, as with qemu-nbd.
    @Test(qemuTrait)
    func probedRawExportAdvertisesSectorAlignmentAsQemuNBD() throws {
        let dir = TempDir()
        let image = dir.file("t.raw")
        try String(repeating: "0", count: 1000).write(toFile: image, atomically: true, encoding: .utf8)
        var outputs: [String] = []
        for server in ["nbd", "qemu-nbd"] {
            let s = try NBDHarness.start(server, [], image: image, dir: dir, tag: "probed-\(server)")
            defer { s.stop() }
            let list = try run("qemu-nbd", "-L", "-k", s.socket)
            let map = try run("qemu-io", "-f", "raw", "-c", "map", s.uri)
            outputs.append(list.stdout + map.stdout)
        }
        #expect(outputs[0].contains("min block: 512"), "\(outputs[0])")
        #expect(outputs[0] == outputs[1], "ours: \(outputs[0])\nqemu: \(outputs[1])")
    }

    /// A probed raw image refuses a write that would make it probe as qcow2 (QEMU's
    /// `raw_check_write`: "Operation not permitted"), and takes one that would not.
    @Test(qemuTrait)
    func probedRawRefusesWriteThatChangesItsFormatAsQemuIO() throws {
        let dir = TempDir()
        let magic = dir.file("magic")
        try Data([0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 3] + [UInt8](repeating: 0, count: 504)).write(to: URL(fileURLWithPath: magic))
        var results: [String] = []
        for io in ["io", "qemu-io"] {
            let image = dir.file("\(io).raw")
            try mustRun("qemu-img", "create", "-q", "-f", "raw", image, "1M")
            let refused = try run(io, "-c", "write -s \(magic) 0 512", image)
            let taken = try run(io, "-c", "write -P 0x51 0 512", image)
            results.append(filtered(refused.stdout + refused.stderr + taken.stdout + taken.stderr, image))
        }
        #expect(results[0].contains("write failed: Operation not permitted"), "\(results[0])")
        #expect(results[0] == results[1], "ours: \(results[0])\nqemu: \(results[1])")
    }
}
