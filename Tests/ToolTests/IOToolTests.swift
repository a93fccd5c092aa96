import Foundation
import Testing
import QBlock
import TestSupport
import ToolSupport
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

/// Runs the `io` executable and `qemu-io` side by side on identical raw images and compares
/// their output (timing values masked), exit status and the resulting image bytes.
enum IOToolHarness {
    /// A finished process run.
    struct Run: Equatable, CustomStringConvertible {
        var stdout: String
        var stderr: String
        var status: Int32
        var description: String { "status \(status)\n--- stdout\n\(stdout)--- stderr\n\(stderr)" }
    }

    static func findExecutable(_ name: String) -> String? {
        let path = ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin"
        for dir in path.split(separator: ":") {
            let p = "\(dir)/\(name)"
            if FileManager.default.isExecutableFile(atPath: p) { return p }
        }
        return nil
    }

    static let qemuIO = findExecutable("qemu-io")
    static let qemuImg = findExecutable("qemu-img")
    static var haveQemu: Bool { qemuIO != nil && qemuImg != nil && ioBinary != nil }

    /// The built `io` tool: next to the test bundle in the build products directory,
    /// else the newest `.build*/**/debug/io` under the package root.
    static let ioBinary: String? = {
        let fm = FileManager.default
        var dirs: [URL] = []
        if let exe = try? fm.destinationOfSymbolicLink(atPath: "/proc/self/exe") {
            dirs.append(URL(fileURLWithPath: exe).deletingLastPathComponent())
        }
        let bundle = Bundle.main.bundleURL
        dirs.append(bundle)
        dirs.append(bundle.deletingLastPathComponent())
        for d in dirs {
            let p = d.appendingPathComponent("io").path
            if fm.isExecutableFile(atPath: p) { return p }
        }
        // #filePath is Tests/ToolTests/IOToolTests.swift: the package root is three levels up.
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent()
        var best: (String, Date)?
        let scratch = (try? fm.contentsOfDirectory(atPath: root.path))?.filter { $0.hasPrefix(".build") } ?? []
        for s in scratch {
            let base = root.appendingPathComponent(s)
            var candidates = [base.appendingPathComponent("debug/io").path]
            for sub in (try? fm.contentsOfDirectory(atPath: base.path)) ?? [] {
                candidates.append(base.appendingPathComponent(sub).appendingPathComponent("debug/io").path)
            }
            for c in candidates where fm.isExecutableFile(atPath: c) {
                let date = ((try? fm.attributesOfItem(atPath: c))?[.modificationDate] as? Date) ?? .distantPast
                if best == nil || date > best!.1 { best = (c, date) }
            }
        }
        return best?.0
    }()

    static func run(_ program: String, _ args: [String], stdin: String? = nil) throws -> Run {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: program)
        p.arguments = args
        let out = Pipe(), err = Pipe()
        p.standardOutput = out
        p.standardError = err
        let input = Pipe()
        p.standardInput = input
        try p.run()
        if let stdin { input.fileHandleForWriting.write(Data(stdin.utf8)) }
        try input.fileHandleForWriting.close()
        // Read both pipes concurrently so neither fills up.
        let errData = LockedData()
        let group = DispatchGroup()
        group.enter()
        DispatchQueue.global().async {
            errData.set(err.fileHandleForReading.readDataToEndOfFile())
            group.leave()
        }
        let outData = out.fileHandleForReading.readDataToEndOfFile()
        group.wait()
        p.waitUntilExit()
        return Run(stdout: String(decoding: outData, as: UTF8.self), stderr: String(decoding: errData.get(), as: UTF8.self),
                   status: p.terminationStatus)
    }

    final class LockedData: @unchecked Sendable {
        private let lock = NSLock()
        private var data = Data()
        func set(_ d: Data) { lock.lock(); data = d; lock.unlock() }
        func get() -> Data { lock.lock(); defer { lock.unlock() }; return data }
    }

    /// Replaces the timing values of qemu-io's report lines, which differ run to run.
    static func mask(_ text: String, image: String, program: String) -> String {
        text.split(separator: "\n", omittingEmptySubsequences: false).map { line -> String in
            var l = String(line).replacingOccurrences(of: image, with: "IMG")
            if l.hasPrefix("\(program): ") { l = "PROG: " + l.dropFirst(program.count + 2) }
            if let r = l.range(of: " ops; ") { return String(l[..<r.lowerBound]) + " ops; TIMING" }
            let fields = l.split(separator: ",")
            if fields.count == 5, Int(fields[0]) != nil, Int(fields[1]) != nil { return "\(fields[0]),\(fields[1]),TIMING" }
            return l
        }.joined(separator: "\n")
    }

    final class TempDir {
        let path: String
        init() throws {
            path = FileManager.default.temporaryDirectory.appendingPathComponent("io-tests-\(UUID().uuidString)").path
            try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        }
        deinit { try? FileManager.default.removeItem(atPath: path) }
    }

    /// A result of running the same arguments through both tools.
    struct Comparison {
        var qemu: Run
        var io: Run
        var qemuImage: Data
        var ioImage: Data
    }

    /// Creates two identical raw images of `size`, runs `args` (with "IMG" standing for the image)
    /// through qemu-io and io, and returns both runs masked.
    static func compare(_ args: [String], size: String = "1M", stdin: String? = nil,
                        format: String = "raw", createOptions: [String] = []) throws -> Comparison {
        let dir = try TempDir()
        let a = dir.path + "/qemu.img", b = dir.path + "/io.img"
        for img in [a, b] {
            _ = try run(qemuImg!, ["create", "-q", "-f", format] + createOptions + [img, size])
        }
        var q = try run(qemuIO!, args.map { $0.replacingOccurrences(of: "IMG", with: a) },
                        stdin: stdin?.replacingOccurrences(of: "IMG", with: a))
        var i = try run(ioBinary!, args.map { $0.replacingOccurrences(of: "IMG", with: b) },
                        stdin: stdin?.replacingOccurrences(of: "IMG", with: b))
        q.stdout = mask(q.stdout, image: a, program: "qemu-io")
        q.stderr = mask(q.stderr, image: a, program: "qemu-io")
        i.stdout = mask(i.stdout, image: b, program: "io")
        i.stderr = mask(i.stderr, image: b, program: "io")
        return Comparison(qemu: q, io: i, qemuImage: FileManager.default.contents(atPath: a) ?? Data(),
                          ioImage: FileManager.default.contents(atPath: b) ?? Data())
    }
}

/// Command lists whose output, status and image effects must match qemu-io's exactly.
let ioScenarios: [[String]] = [
    // Writes, reads, pattern verification (pass and fail), dumps.
    ["-f", "raw", "-c", "write -P 0xab 0 64k", "-c", "read -P 0xab 0 512", "-c", "read -P 0xcd 0 512",
     "-c", "read -v 0 48", "-c", "read -v 5 21", "-c", "length", "-c", "info", "-c", "flush", "IMG"],
    ["-f", "raw", "-c", "write -P 1 1k 1k", "-c", "read -P 1 -s 1k -l 512 0 2k", "-c", "read -P 1 -s 512 0 2k",
     "-c", "read -q -P 1 1k 1k", "-c", "read -C 0 512", "-c", "write -C -P 9 0 1", "IMG"],
    // Out-of-range requests.
    ["-f", "raw", "-c", "read 1M 512", "-c", "read 1020k 8k", "-c", "write 1M 1", "-c", "discard 0 2M",
     "-c", "read 1M 0", "-c", "read 2M 0", "-c", "readv 1M 1", "-c", "writev 1023k 1k 1", "IMG"],
    // Zero writes, discard, map, alloc.
    ["-f", "raw", "-c", "write -P 1 64k 64k", "-c", "write -z 128k 64k", "-c", "write -z -u 192k 4k",
     "-c", "discard 256k 64k", "-c", "discard -q 0 1", "-c", "map", "-c", "alloc 0 128k", "-c", "alloc 0",
     "-c", "alloc 64k 1M", "-c", "alloc 1M", "-c", "alloc 100", "-c", "alloc 0x10 0x10", "IMG"],
    // Vectored and asynchronous requests.
    ["-f", "raw", "-c", "writev -P 3 0 512 1k 3", "-c", "readv -P 3 0 512 1k 3", "-c", "readv -v 0 16 16",
     "-c", "readv -P 4 0 1", "-c", "aio_write -P 5 8k 4k", "-c", "aio_flush", "-c", "aio_read -P 5 8k 4k",
     "-c", "aio_flush", "-c", "aio_read -P 6 8k 512", "-c", "aio_flush", "-c", "aio_read 2M 1", "-c", "aio_flush",
     "-c", "aio_write -z 8k 4k", "-c", "aio_flush", "-c", "aio_read -v -P 0 8k 20", "-c", "aio_flush", "IMG"],
    // Argument errors.
    ["-f", "raw", "-c", "read 0 abc", "-c", "read -P 0x1ff 0 512", "-c", "read 0 3G", "-c", "read",
     "-c", "read 0 1k 5", "-c", "read -l 100 0 512", "-c", "read -P 0 -s 600 0 512", "-c", "bogus",
     "-c", "read -x 0 1", "-c", "read 0 9E", "-c", "read 0 1.5", "-c", "read 0 1.5k", "-c", "read 0x10k 1",
     "-c", "write -z -P 1 0 1", "-c", "write -u 0 1", "-c", "write -n 0 1", "-c", "write 0 3G",
     "-c", "write -c 1 512", "-c", "write -c 0 64k", "-c", "writev 0 3G", "-c", "discard 0 3G",
     "-c", "alloc -1", "-c", "alloc 1 2 3", "-c", "length 1", "-c", "help bogus", "-c", "truncate -m bogus 1M", "IMG"],
    // Truncate, aliases, quit.
    ["-f", "raw", "-c", "truncate 2M", "-c", "l", "-c", "t 512k", "-c", "length", "-c", "r -P 0 0 1",
     "-c", "w 0 1", "-c", "quit", "-c", "write 0 1", "IMG"],
    // Read-only image, close and reopen.
    ["-r", "-f", "raw", "-c", "write 0 1", "-c", "discard 0 1", "-c", "truncate 0", "-c", "read 0 1",
     "-c", "close", "-c", "length", "-c", "open -o driver=raw IMG", "-c", "write -P 7 1 1", "-c", "open IMG", "IMG"],
    // Probed raw (warning on stderr), cache modes.
    ["-c", "write -P 2 0 4k", "-c", "read -P 2 0 4k", "IMG"],
    ["-f", "raw", "-t", "none", "-c", "write -P 9 1 1000", "-c", "read -P 9 1 1000", "-c", "read -v 0 3", "IMG"],
    ["-f", "raw", "-n", "-c", "write -f -P 8 100 10k", "IMG"],
    // Open failures.
    ["-f", "raw", "-c", "length", "/nonexistent/image"],
    ["-f", "bogus", "-c", "length", "IMG"],
    ["-t", "bogus", "-c", "length", "IMG"],
    ["-U", "-f", "raw", "-c", "length", "IMG"],
    ["-c", "length"],
    ["-c", "open /nonexistent/image"],
]

/// qcow2 command lists: output must be identical to qemu-io's, and the resulting image file
/// too, byte for byte (same cluster allocation order, same metadata) — except where the
/// refcount table has to grow (512-byte clusters), which both place validly but differently:
/// there the images must hold the same data and both pass qemu-img check.
let ioQcow2Scenarios: [([String], [String])] = [
    (["-c", "write -P 0xab 0 64k", "-c", "write -z 64k 64k", "-c", "write -P 0x12 200k 5k", "-c", "discard 0 64k",
      "-c", "map", "-c", "alloc 0 4M", "-c", "read -P 0x12 200k 5k", "-c", "read -P 0 0 128k", "IMG"], []),
    (["-c", "write -P 1 1000 100000", "-c", "write -P 2 3M 1k", "-c", "write -z -u 0 8k", "-c", "writev -P 3 2M 512 1k 3",
      "-c", "aio_write -P 4 5M 64k", "-c", "aio_flush", "-c", "read -P 4 5M 64k", "-c", "truncate 16M", "-c", "length",
      "-c", "write -P 5 15M 1M", "-c", "map", "IMG"], ["-o", "cluster_size=4096"]),
    (["-c", "write -P 7 0 1M", "-c", "discard 128k 256k", "-c", "write -z 512k 512k", "-c", "map", "-c", "info", "IMG"],
     ["-o", "compat=0.10"]),
    (["-c", "write -P 9 0 8k", "-c", "write -P 10 100k 300k", "-c", "discard 0 2M", "-c", "write -P 11 33k 1", "-c", "map", "IMG"],
     ["-o", "cluster_size=512"]),
    // Compressed and VM state requests (iotests 029, 090): clusters one request each (in
    // one multi-cluster request QEMU compresses the clusters in parallel threads, so which
    // one gets the lower host offset varies from run to run, in QEMU too), the last cluster,
    // VM state far past the disk (the L1 table grows).
    (["-c", "write -c -P 0x2a 0 64k", "-c", "write -c -P 0x2a 64k 64k", "-c", "write -c -P 3 8128k 64k", "-c", "read -P 0x2a 0 128k",
      "-c", "write -b -P 0x11 0 4k", "-c", "write -b -P 0x22 1G 8k", "-c", "read -b -P 0x11 0 4k", "-c", "read -b -P 0x22 1G 8k", "-c", "read -b -P 0 64k 4k", "-c", "map", "IMG"], []),
]

@Suite("io tool")
struct IOToolTests {
    @Test("io matches qemu-io on qcow2, image bytes included",
          .enabled(if: IOToolHarness.haveQemu, "needs qemu-io, qemu-img and the built io tool"),
          arguments: ioQcow2Scenarios)
    func matchesQemuIOOnQcow2(_ scenario: ([String], [String])) throws {
        let c = try IOToolHarness.compare(scenario.0, size: "8M", format: "qcow2", createOptions: scenario.1)
        #expect(c.io.stdout == c.qemu.stdout)
        #expect(c.io.stderr == c.qemu.stderr)
        #expect(c.io.status == c.qemu.status)
        #expect(c.io.status == 0)
        if scenario.1.contains("cluster_size=512") {
            let dir = try IOToolHarness.TempDir()
            let a = dir.path + "/a.qcow2", b = dir.path + "/b.qcow2"
            #expect(FileManager.default.createFile(atPath: a, contents: c.qemuImage))
            #expect(FileManager.default.createFile(atPath: b, contents: c.ioImage))
            #expect(try IOToolHarness.run(IOToolHarness.qemuImg!, ["compare", a, b]).status == 0)
            #expect(try IOToolHarness.run(IOToolHarness.qemuImg!, ["check", b]).status == 0)
        } else {
            #expect(c.ioImage == c.qemuImage, "image files differ")
        }
    }

    @Test("io matches qemu-io", .enabled(if: IOToolHarness.haveQemu, "needs qemu-io, qemu-img and the built io tool"),
          arguments: ioScenarios)
    func matchesQemuIO(_ args: [String]) throws {
        let c = try IOToolHarness.compare(args)
        #expect(c.io.stdout == c.qemu.stdout)
        #expect(c.io.stderr == c.qemu.stderr)
        #expect(c.io.status == c.qemu.status)
        #expect(c.io.status == (c.qemu.status == 0 ? 0 : 1))
        #expect(c.ioImage == c.qemuImage, "images differ after the same commands")
    }

    @Test("interactive prompt on standard input", .enabled(if: IOToolHarness.haveQemu))
    func interactive() throws {
        for input in ["length\nread -P 0 0 512\n\nbogus\nwrite -P 1 0 1\n", "length\nquit\nlength\n",
                      "close\nopen -o driver=raw IMG\nlength", ""] {
            let c = try IOToolHarness.compare(["-f", "raw", "IMG"], stdin: input)
            #expect(c.io.stdout == c.qemu.stdout)
            #expect(c.io.stderr == c.qemu.stderr)
            #expect(c.io.status == c.qemu.status)
        }
    }

    @Test("bytes written by io read back through qemu-io and vice versa", .enabled(if: IOToolHarness.haveQemu))
    func crossCheck() throws {
        let dir = try IOToolHarness.TempDir()
        let img = dir.path + "/x.img"
        _ = try IOToolHarness.run(IOToolHarness.qemuImg!, ["create", "-q", "-f", "raw", img, "4M"])
        let w = try IOToolHarness.run(IOToolHarness.ioBinary!, [
            "-f", "raw", "-c", "write -P 0x5a 1000 100k", "-c", "write -z 2M 64k", "-c", "writev -P 0x11 3M 512 1k 3",
            "-c", "truncate 5M", img])
        #expect(w.status == 0, "\(w)")
        let r = try IOToolHarness.run(IOToolHarness.qemuIO!, [
            "-f", "raw", "-c", "read -q -P 0x5a 1000 100k", "-c", "read -q -P 0x11 3M 1539", "-c", "read -q -P 0 2M 64k",
            "-c", "length", img])
        #expect(r.status == 0 && r.stdout == "5 MiB\n", "\(r)")
        let w2 = try IOToolHarness.run(IOToolHarness.qemuIO!, ["-f", "raw", "-c", "write -q -P 0x77 4M 300k", img])
        #expect(w2.status == 0)
        let r2 = try IOToolHarness.run(IOToolHarness.ioBinary!, [
            "-f", "raw", "-c", "read -q -P 0x77 4M 300k", "-c", "read -q -P 0 2M 64k", "-c", "read -q -P 0x5a 1000 100k", img])
        #expect(r2.status == 0 && r2.stdout.isEmpty && r2.stderr.isEmpty, "\(r2)")
    }

    @Test("a write io acknowledged in writethrough mode (its default) survives SIGKILL, metadata included",
          .enabled(if: IOToolHarness.haveQemu), arguments: [[], ["-t", "writethrough"], ["-t", "directsync"]])
    func writethroughSurvivesKill(cacheArgs: [String]) throws {
        let dir = try IOToolHarness.TempDir()
        let img = dir.path + "/x.qcow2"
        _ = try IOToolHarness.run(IOToolHarness.qemuImg!, ["create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", img, "128M"])
        // sigraise 9 kills io before any close or flush of its own: only what each write
        // made durable is in the file (iotests 039).
        let w = try IOToolHarness.run(IOToolHarness.ioBinary!, cacheArgs + [
            "-c", "write -q -P 0x5a 0 512", "-c", "write -q -z 1M 64k", "-c", "write -q -P 0x33 2M 64k",
            "-c", "sigraise 9", img])
        #expect(w.status == 9 || w.status == 137, "\(w)")
        let r = try IOToolHarness.run(IOToolHarness.qemuIO!, [
            "-r", "-c", "read -q -P 0x5a 0 512", "-c", "read -q -P 0 1M 64k", "-c", "read -q -P 0x33 2M 64k", img])
        #expect(r.status == 0 && r.stdout.isEmpty && r.stderr.isEmpty, "\(r)")
    }

    @Test("lazy refcounts: a guest flush leaves refcounts cached while the image is dirty, as QEMU (iotests 039)",
          .enabled(if: IOToolHarness.haveQemu))
    func lazyRefcountsFlushLikeQemu() throws {
        var checks: [Int32] = []
        for writer in [IOToolHarness.qemuIO!, IOToolHarness.ioBinary!] {
            let dir = try IOToolHarness.TempDir()
            let img = dir.path + "/x.qcow2"
            _ = try IOToolHarness.run(IOToolHarness.qemuImg!, ["create", "-q", "-f", "qcow2", "-o", "compat=1.1,lazy_refcounts=on", img, "128M"])
            _ = try IOToolHarness.run(writer, ["-t", "writethrough", "-c", "write -q -P 0x5a 0 512", "-c", "sigraise 9", img])
            // The data cluster is referenced and durable; its refcount is not (the dirty bit says so).
            let check = try IOToolHarness.run(IOToolHarness.qemuImg!, ["check", img])
            checks.append(check.status)
            #expect((check.stdout + check.stderr).contains("ERROR cluster 5 refcount=0 reference=1"), "\(writer): \(check)")
            let r = try IOToolHarness.run(IOToolHarness.qemuIO!, ["-r", "-c", "read -q -P 0x5a 0 512", img])
            #expect(r.status == 0 && r.stdout.isEmpty, "\(writer): \(r)")
            let repaired = try IOToolHarness.run(IOToolHarness.qemuImg!, ["check", "-r", "all", img])
            #expect(repaired.status == 0, "\(repaired)")
        }
        #expect(checks[0] == checks[1])
    }

    @Test("a raw file whose size is no multiple of 512 is a disk of whole sectors, its tail reading zeros, as QEMU (iotests 101)",
          .enabled(if: IOToolHarness.haveQemu))
    func shortRawFileReadsAsWholeSectors() throws {
        var outputs: [String] = []
        for tool in [IOToolHarness.qemuIO!, IOToolHarness.ioBinary!] {
            let dir = try IOToolHarness.TempDir()
            let img = dir.path + "/x.raw"
            #expect(FileManager.default.createFile(atPath: img, contents: Data(repeating: 7, count: 320)))
            let r = try IOToolHarness.run(tool, ["-f", "raw", "-c", "length", "-c", "read -q -P 7 0 320", "-c", "read -q -P 0 320 192",
                                                  "-c", "write -q -P 9 256 256", "-c", "length", "-c", "map", img])
            #expect(r.status == 0, "\(tool): \(r)")
            outputs.append(r.stdout + r.stderr.replacingOccurrences(of: "\(tool): ", with: "qemu-io: "))
            #expect((try? FileManager.default.attributesOfItem(atPath: img)[.size] as? Int) == 512)
        }
        #expect(outputs[0] == outputs[1])
    }

    @Test("-s (snapshot mode) writes to a temporary overlay; -d ignore drops discards", .enabled(if: IOToolHarness.haveQemu))
    func snapshotModeAndDiscardIgnore() throws {
        let dir = try IOToolHarness.TempDir()
        let img = dir.path + "/x.qcow2"
        _ = try IOToolHarness.run(IOToolHarness.qemuImg!, ["create", "-q", "-f", "qcow2", img, "1M"])
        _ = try IOToolHarness.run(IOToolHarness.qemuIO!, ["-c", "write -q -P 1 0 64k", img])
        let before = try Data(contentsOf: URL(fileURLWithPath: img))
        let s = try IOToolHarness.run(IOToolHarness.ioBinary!, [
            "--aio", "threads", "-s", "-c", "write -q -P 2 0 4k", "-c", "read -q -P 2 0 4k", "-c", "read -q -P 1 4k 60k", img])
        #expect(s.status == 0 && s.stdout.isEmpty && s.stderr.isEmpty, "\(s)")
        #expect(try Data(contentsOf: URL(fileURLWithPath: img)) == before, "snapshot mode changed the image")
        let d = try IOToolHarness.run(IOToolHarness.ioBinary!, ["-d", "ignore", "-c", "discard -q 0 64k", "-c", "read -q -P 1 0 64k", img])
        #expect(d.status == 0 && d.stdout.isEmpty && d.stderr.isEmpty, "\(d)")
        let bad = try IOToolHarness.run(IOToolHarness.ioBinary!, ["--aio", "native", "-c", "read -q 0 1", img])
        let ref = try IOToolHarness.run(IOToolHarness.qemuIO!, ["--aio", "native", "-c", "read -q 0 1", img])
        #expect(bad.status == ref.status)
        #expect(bad.stderr.replacingOccurrences(of: "io: ", with: "qemu-io: ") == ref.stderr)
    }

    @Test("failures exit 1 with one-line errors", .enabled(if: IOToolHarness.ioBinary != nil))
    func exitStatus() throws {
        let io = try #require(IOToolHarness.ioBinary)
        let missing = try IOToolHarness.run(io, ["-c", "length", "/nonexistent/image"])
        #expect(missing.status == 1)
        #expect(missing.stderr == "io: can't open device /nonexistent/image: Could not open '/nonexistent/image': No such file or directory\n")
        #expect(missing.stdout.isEmpty)
        let dir = try IOToolHarness.TempDir()
        let img = dir.path + "/x.img"
        #expect(FileManager.default.createFile(atPath: img, contents: Data(count: 65536)))
        let ok = try IOToolHarness.run(io, ["-f", "raw", "-c", "write -q -P 1 0 4k", "-c", "read -q -P 1 0 4k", img])
        #expect(ok.status == 0 && ok.stdout.isEmpty, "\(ok)")
        let bad = try IOToolHarness.run(io, ["-f", "raw", "-c", "read 64k 1", "-c", "length", img])
        #expect(bad.status == 1)
        #expect(bad.stdout == "read failed: Input/output error\n64 KiB\n")
    }
}

@Suite("qemu-io number and pattern helpers")
struct QemuNumbersTests {
    @Test(arguments: [
        ("0", Int64(0)), ("512", 512), ("64k", 65536), ("1M", 1 << 20), ("1.5k", 1536), ("0x200", 512),
        ("1b", 1), ("010", 10), ("1.k", 1024), ("+5", 5), ("0.0001k", 0), ("7E", 7 << 60), ("0x10k", 16384),
    ])
    func parses(_ text: String, _ value: Int64) {
        #expect(QemuNumbers.parseSize(text) == .success(value))
    }

    @Test(arguments: ["", "abc", "1.5", "0.5", "1k5", "1e3", "0x", "-1", "1.5e3k", "0x1.5", "1x"])
    func rejects(_ text: String) {
        #expect(QemuNumbers.parseSize(text) == .failure(.invalid))
    }

    @Test(arguments: ["8E", "99999999999999999999", "16E"])
    func tooLarge(_ text: String) {
        #expect(QemuNumbers.parseSize(text) == .failure(.tooLarge))
    }

    @Test(arguments: [
        (0.0, "0 bytes"), (512.0, "512 bytes"), (1536.0, "1.500 KiB"), (65536.0, "64 KiB"), (1048576.0, "1 MiB"),
        (1000.5, "1000.500000 bytes"), (8.0 * 1073741824, "8 GiB"),
    ])
    func formats(_ value: Double, _ text: String) {
        #expect(QemuNumbers.formatSize(value) == text)
    }

    @Test func times() {
        #expect(QemuNumbers.formatTime(seconds: 0, nanoseconds: 1_234_000, verbose: false) == "00.00 sec")
        #expect(QemuNumbers.formatTime(seconds: 0, nanoseconds: 120_000_000, verbose: true) == "0:00:00.12")
        #expect(QemuNumbers.formatTime(seconds: 3725, nanoseconds: 500_000_000, verbose: false) == "1:02:05.50")
    }

    @Test func patterns() {
        #expect(Pattern.parseByte("0xab") == 0xab)
        #expect(Pattern.parseByte("010") == 8)
        #expect(Pattern.parseByte("255") == 255)
        #expect(Pattern.parseByte("256") == nil)
        #expect(Pattern.parseByte("-1") == nil)
        #expect(Pattern.parseByte("0x") == nil)
        let bytes: [UInt8] = Array("Hello, qemu-io!\u{0}ab".utf8)
        let dumped = bytes.withUnsafeBytes { Pattern.hexDump($0, offset: 0x10) }
        #expect(dumped == """
            00000010:  48 65 6c 6c 6f 2c 20 71 65 6d 75 2d 69 6f 21 00  Hello..qemu.io..
            00000020:  61 62  ab

            """)
    }
}
