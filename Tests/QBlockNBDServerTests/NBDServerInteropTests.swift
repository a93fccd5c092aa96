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


@Suite(.serialized, .enabled(if: NBDHarness.ready, Comment(rawValue: NBDHarness.missing)))
struct NBDServerInteropTests {
    /// nbdinfo's view (export list, size, every capability, block sizes, contexts) of our
    /// server equals its view of qemu-nbd with the same options.
    @Test(arguments: [[], ["-r"], ["-A"], ["-e", "2"], ["-x", "disk", "-D", "my disk"], ["--discard=unmap", "-r", "-A"]])
    func nbdinfoMatchesQemuNbd(_ options: [String]) throws {
        let dir = TempDir("nbds")
        let image = try NBDHarness.chain(dir)
        let name = options.firstIndex(of: "-x").map { options[$0 + 1] } ?? ""
        func info(_ tool: String) throws -> String {
            try NBDHarness.with(tool, ["-t", "-f", "qcow2"] + options, image: image, dir: dir, tag: tool) { s in
                let list = try mustRun("nbdinfo", "--list", s.uri).stdout
                let one = try mustRun("nbdinfo", s.uri(name)).stdout
                return (list + one).replacingOccurrences(of: s.socket, with: "SOCKET")
            }
        }
        let ours = try info("nbd"), theirs = try info("qemu-nbd")
        #expect(ours == theirs)
        #expect(ours.contains("block_size_maximum: 33554432"))
    }

    /// `nbdinfo --map` (base:allocation) and `--map=qemu:allocation-depth` equal qemu-nbd's,
    /// and base:allocation equals the allocation `qemu-img map` reports.
    @Test func mapsMatchQemu() throws {
        let dir = TempDir("nbds")
        let image = try NBDHarness.chain(dir)
        func maps(_ tool: String) throws -> [String] {
            try NBDHarness.with(tool, ["-t", "-r", "-A", "-f", "qcow2"], image: image, dir: dir, tag: tool) { s in
                [try mustRun("nbdinfo", "--map", s.uri).stdout,
                 try mustRun("nbdinfo", "--map=qemu:allocation-depth", s.uri).stdout,
                 try mustRun("nbdinfo", "--map", "--totals", s.uri).stdout]
            }
        }
        let ours = try maps("nbd"), theirs = try maps("qemu-nbd")
        #expect(ours == theirs)
        #expect(ours[1].contains("local") && ours[1].contains("backing depth 2"))

        // From qemu-img map: type = HOLE (not data) | ZERO, adjacent equal types merged.
        let json = try mustRun("qemu-img", "map", "--output=json", "-f", "qcow2", image).stdout
        let entries = (try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [[String: Any]]) ?? []
        var runs: [(Int, Int, Int)] = []
        for e in entries {
            let start = e["start"] as? Int ?? 0, length = e["length"] as? Int ?? 0
            let type = ((e["data"] as? Bool) == true ? 0 : 1) | ((e["zero"] as? Bool) == true ? 2 : 0)
            if let last = runs.last, last.2 == type { runs[runs.count - 1].1 += length } else { runs.append((start, length, type)) }
        }
        let ourRuns = ours[0].split(separator: "\n").map { line -> (Int, Int, Int) in
            let f = line.split(separator: " ", omittingEmptySubsequences: true)
            return (Int(f[0]) ?? -1, Int(f[1]) ?? -1, Int(f[2]) ?? -1)
        }
        #expect(ourRuns.map { "\($0.0) \($0.1) \($0.2)" } == runs.map { "\($0.0) \($0.1) \($0.2)" })
    }

    /// nbdcopy out of our server gives the image's bytes; nbdcopy into it writes them.
    @Test func nbdcopyOutAndIn() throws {
        let dir = TempDir("nbds")
        let image = try NBDHarness.chain(dir)
        let out = dir.file("out.raw")
        try NBDHarness.with("nbd", ["-r", "-f", "qcow2"], image: image, dir: dir, tag: "out") { s in
            try mustRun("nbdcopy", s.uri, out)
        }
        try mustRun("qemu-img", "compare", "-f", "qcow2", "-F", "raw", image, out)

        // Into a fresh qcow2 of the same size, through several connections (-e 4: multi-conn).
        let target = dir.file("in.qcow2")
        try mustRun("qemu-img", "create", "-q", "-f", "qcow2", target, "8M")
        try NBDHarness.with("nbd", ["-t", "-e", "4", "-f", "qcow2", "--discard=unmap"], image: target, dir: dir, tag: "in") { s in
            try mustRun("nbdcopy", "--connections=4", out, s.uri)
            try mustRun("nbdcopy", "--flush", out, s.uri)
        }
        try mustRun("qemu-img", "compare", "-f", "raw", "-F", "qcow2", out, target)
        try mustRun("qemu-img", "check", "-q", target)
    }

    /// qemu-io's writes, zeroes, discards and flushes through our server give the same image
    /// as the same commands run on a copy directly.
    @Test(arguments: [["--discard=unmap"], ["--discard=ignore"], ["--detect-zeroes=on"], ["--cache=writethrough"]])
    func qemuIOWritesMatchDirectWrites(_ options: [String]) throws {
        let dir = TempDir("nbds")
        let image = try NBDHarness.chain(dir)
        let copy = dir.file("copy.qcow2")
        try mustRun("cp", image, copy)
        let commands = ["write -P 9 0 64k", "write -P 8 3M 1M", "write -z 1M 128k", "discard 7M 64k", "write -z -u 2M 64k",
                        "writev -P 7 5M 4k 4k", "write -P 0 6M 8k", "flush", "aio_write -P 6 100k 4k",
                        "aio_write -P 5 300k 4k", "aio_flush", "read -P 9 0 64k", "read -P 8 3M 1M"]
        let uri: String
        let s = try NBDHarness.start("nbd", ["-f", "qcow2"] + options, image: image, dir: dir, tag: "io")
        defer { s.stop() }
        uri = s.uri
        let r = try run("qemu-io", ["-f", "raw"] + commands.flatMap { ["-c", $0] } + [uri])
        #expect(r.status == 0 && !r.stdout.contains("fail") && !r.stderr.contains("error"), "\(r)")
        NBDHarness.waitGone(s.pid)   // not persistent: it exits after qemu-io leaves
        // With discard=ignore the server keeps discarded data: leave discards out of the reference.
        let unmaps = options.contains("--discard=unmap")
        let reference = commands.filter { !$0.hasPrefix("read") && (unmaps || !$0.hasPrefix("discard")) }
        let direct = try run("qemu-io", ["-f", "qcow2"] + reference.flatMap { ["-c", $0] } + [copy])
        #expect(direct.status == 0)
        try mustRun("qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", image, copy)
        try mustRun("qemu-img", "check", "-q", image)
    }

    /// A read-only export: qemu-io refuses to open it for writing exactly as with qemu-nbd,
    /// and still reads it. (EPERM on the wire for writes is in NBDServerHostileTests.)
    @Test func readOnlyRefusesWrites() throws {
        let dir = TempDir("nbds")
        let image = try NBDHarness.chain(dir)
        func attempt(_ tool: String) throws -> [String] {
            try NBDHarness.with(tool, ["-t", "-r", "-f", "qcow2"], image: image, dir: dir, tag: tool) { s in
                var out: [String] = []
                for cmd in ["write -P 1 0 4k", "write -z 0 4k", "discard 0 4k"] {
                    let r = try run("qemu-io", "-f", "raw", "-c", cmd, s.uri)
                    #expect(r.status != 0)
                    out.append((r.stdout + r.stderr).replacingOccurrences(of: s.socket, with: "SOCKET"))
                }
                let r = try run("qemu-io", "-r", "-f", "raw", "-c", "read -P 1 1M 64k", s.uri)
                #expect(r.status == 0 && !r.stdout.contains("fail"), "\(r)")
                return out
            }
        }
        let ours = try attempt("nbd"), theirs = try attempt("qemu-nbd")
        #expect(ours == theirs)
        #expect(ours.allSatisfy { $0.contains("Permission denied") })
        try mustRun("qemu-img", "check", "-q", image)
    }

    /// Our server in-process on 127.0.0.1 with a free port: qemu-img info, compare and
    /// convert over nbd://, and several clients at once.
    @Test func tcpInProcess() async throws {
        let dir = TempDir("nbds")
        let image = try NBDHarness.chain(dir)
        let node = try await ImageOpener.open(image, options: OpenOptions(format: "qcow2", readOnly: true))
        let server = NBDServer(exports: [try NBDExport(name: "disk", node: node, options: .init(readOnly: true))],
                               options: .init(maxClients: 4, persistent: true))
        guard case .tcp(_, let port) = try server.listen(host: "127.0.0.1", port: 0) else {
            Issue.record("no port")
            return
        }
        try server.start()
        let running = Task { try await server.run() }
        let uri = "nbd://127.0.0.1:\(port)/disk"
        let outcome: Result<Void, Error> = await IOThreadPool.shared.run {
            Result {
                let info = try mustRun("qemu-img", "info", "-f", "raw", uri).stdout
                #expect(info.contains("virtual size: 8 MiB (8388608 bytes)"))
                try mustRun("qemu-img", "compare", "-U", "-f", "qcow2", "-F", "raw", image, uri)
                let converted = dir.file("conv.qcow2")
                try mustRun("qemu-img", "convert", "-f", "raw", "-O", "qcow2", uri, converted)
                try mustRun("qemu-img", "compare", "-U", "-f", "qcow2", "-F", "qcow2", image, converted)
                // Four clients at once.
                let group = DispatchGroup()
                let results = LockedResults()
                for i in 0..<4 {
                    group.enter()
                    DispatchQueue.global().async {
                        let r = try? run("qemu-io", "-r", "-f", "raw", "-c", "read -P 3 \(i * 256)k 256k", uri)
                        results.add(r?.status == 0 && r?.stdout.contains("fail") == false)
                        group.leave()
                    }
                }
                #expect(group.wait(timeout: .now() + 60) == .success)
                #expect(results.all == [true, true, true, true])
            }
        }
        await server.shutdown()
        try await running.value
        try await node.close()
        try outcome.get()
        #expect(server.clientCount == 0)
    }
}


final class LockedResults: @unchecked Sendable {
    private let lock = NSLock()
    private var values: [Bool] = []
    func add(_ v: Bool) { lock.lock(); values.append(v); lock.unlock() }
    var all: [Bool] { lock.lock(); defer { lock.unlock() }; return values }
}
