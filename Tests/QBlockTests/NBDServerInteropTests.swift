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

/// Starting and stopping NBD servers (ours and qemu-nbd) for the interop tests.
enum NBDHarness {
    static let haveClients = Tools.which("nbdinfo") != nil && Tools.which("nbdcopy") != nil
    static let haveQemu = Tools.qemuAvailable && Tools.which("qemu-nbd") != nil
    static let ready = haveClients && haveQemu && Tools.executable("nbd") != nil
    static let missing = "needs nbdinfo/nbdcopy (libnbd-bin), qemu-nbd/qemu-io/qemu-img (qemu-utils) and the built nbd tool; skipped"

    /// A server process started with --fork (both tools return once the socket listens).
    struct Server {
        let pid: pid_t
        let socket: String
        /// Our own child (reaped with waitpid) rather than a daemon.
        let child: Bool
        var uri: String { "nbd+unix:///?socket=\(socket)" }
        func uri(_ name: String) -> String { "nbd+unix:///\(name)?socket=\(socket)" }

        /// SIGTERM, then waits (at most 10 s) for the process to be gone.
        func stop() {
            kill(pid, SIGTERM)
            if child { _ = NBDHarness.reap(pid) } else { NBDHarness.waitGone(pid) }
        }
    }

    /// posix_spawn with standard output and error appended to `output`, a clean signal
    /// mask and default dispositions (a test thread may block signals, and a child inherits
    /// that). Foundation's Process is avoided: a daemonizing child confuses its reaping.
    static func spawn(_ argv: [String], output: String) -> pid_t? {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, output, O_WRONLY | O_CREAT | O_APPEND, 0o644)
        posix_spawn_file_actions_adddup2(&actions, 1, 2)
        var attr = posix_spawnattr_t()
        posix_spawnattr_init(&attr)
        defer { posix_spawnattr_destroy(&attr) }
        var empty = sigset_t()
        sigemptyset(&empty)
        var defaults = sigset_t()
        sigemptyset(&defaults)
        for sig in [SIGTERM, SIGINT, SIGHUP, SIGPIPE] { sigaddset(&defaults, sig) }
        posix_spawnattr_setsigmask(&attr, &empty)
        posix_spawnattr_setsigdefault(&attr, &defaults)
        posix_spawnattr_setflags(&attr, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))
        var cargs = argv.map { strdup($0) } + [nil]
        defer { for a in cargs { free(a) } }
        var pid: pid_t = 0
        guard posix_spawn(&pid, argv[0], &actions, &attr, &cargs, environ) == 0 else { return nil }
        return pid
    }

    /// The exit status of a child (waits for it).
    static func reap(_ pid: pid_t) -> Int32 {
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        return (status & 0x7f) == 0 ? (status >> 8) & 0xff : -1
    }

    static func waitGone(_ pid: pid_t) {
        let deadline = Date().addingTimeInterval(10)
        while Date() < deadline {
            if kill(pid, 0) != 0 { return }
            // A daemon whose parent is gone may linger as a zombie where nobody reaps it.
            // (/proc files report size 0, so they are read with read(2) rather than Foundation.)
            let fd = open("/proc/\(pid)/stat", O_RDONLY)
            if fd >= 0 {
                var buf = [UInt8](repeating: 0, count: 512)
                let n = read(fd, &buf, buf.count)
                close(fd)
                let stat = String(decoding: buf.prefix(max(0, n)), as: UTF8.self)
                if let close = stat.lastIndex(of: ")"), stat.distance(from: close, to: stat.endIndex) > 2,
                   stat[stat.index(close, offsetBy: 2)] == "Z" { return }
            }
            usleep(20_000)
        }
    }

    /// Starts `nbd` (ours, with --fork and --pid-file: it returns once listening) or
    /// `qemu-nbd` (in the foreground as our child: qemu-nbd 7.2's --fork writes the pid of
    /// the parent that exits into the pid file) on a Unix socket in `dir`.
    static func start(_ tool: String, _ args: [String], image: String, dir: TempDir, tag: String) throws -> Server {
        let socket = dir.file("\(tag).sock"), pidFile = dir.file("\(tag).pid"), log = dir.file("\(tag).log")
        if tool == "nbd" {
            let argv = [Tools.executable("nbd") ?? "nbd", "--fork", "--pid-file", pidFile, "-k", socket] + args + [image]
            let status = spawn(argv, output: log).map(reap) ?? -1
            let output = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
            guard status == 0, let text = try? String(contentsOfFile: pidFile, encoding: .utf8),
                  let pid = pid_t(text.trimmingCharacters(in: .whitespacesAndNewlines)) else {
                throw NBDStartFailed(description: "nbd \(args.joined(separator: " ")) did not start: \(output)")
            }
            return Server(pid: pid, socket: socket, child: false)
        }
        guard let pid = spawn([Tools.which(tool) ?? tool, "-k", socket] + args + [image], output: log) else {
            throw NBDStartFailed(description: "\(tool) could not be started")
        }
        let deadline = Date().addingTimeInterval(10)
        while !FileManager.default.fileExists(atPath: socket) {
            var status: Int32 = 0
            if waitpid(pid, &status, WNOHANG) == pid || Date() > deadline {
                kill(pid, SIGKILL)
                _ = waitpid(pid, &status, WNOHANG)
                let output = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
                throw NBDStartFailed(description: "\(tool) \(args.joined(separator: " ")) did not start: \(output)")
            }
            usleep(10_000)
        }
        usleep(50_000)  // the socket file exists just before listen()
        return Server(pid: pid, socket: socket, child: true)
    }

    /// Runs `body` against a server, stopping it afterwards whatever happens.
    @discardableResult
    static func with<T>(_ tool: String, _ args: [String], image: String, dir: TempDir, tag: String,
                        _ body: (Server) throws -> T) throws -> T {
        let s = try start(tool, args, image: image, dir: dir, tag: tag)
        defer { s.stop() }
        return try body(s)
    }

    /// A qcow2 image of 8 MiB with data, zeros and holes over a backing file.
    static func chain(_ dir: TempDir) throws -> String {
        let base = dir.file("base.qcow2"), top = dir.file("top.qcow2")
        try mustRun("qemu-img", "create", "-q", "-f", "qcow2", base, "8M")
        try mustRun("qemu-io", "-f", "qcow2", "-c", "write -P 3 0 2M", "-c", "write -P 4 6M 512k", base)
        try mustRun("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top, cwd: dir.path)
        try mustRun("qemu-io", "-f", "qcow2", "-c", "write -P 1 1M 64k", "-c", "write -z 4M 1M", "-c", "write -P 2 7M 4k",
                    "-c", "write -z 6M 64k", top)
        return top
    }
}

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

struct NBDStartFailed: Error, CustomStringConvertible {
    let description: String
}

final class LockedResults: @unchecked Sendable {
    private let lock = NSLock()
    private var values: [Bool] = []
    func add(_ v: Bool) { lock.lock(); values.append(v); lock.unlock() }
    var all: [Bool] { lock.lock(); defer { lock.unlock() }; return values }
}
