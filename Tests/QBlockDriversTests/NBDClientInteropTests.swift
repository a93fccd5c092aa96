#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Testing
import TestSupport
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

// MARK: Fixtures: NBD servers as child processes

struct NBDTestTimeout: Error, CustomStringConvertible {
    var what: String
    var description: String { "timed out: \(what)" }
}

final class NBDTestOnce: @unchecked Sendable {
    private let lock = NSLock()
    private var done = false
    func take() -> Bool { lock.lock(); defer { lock.unlock() }; if done { return false }; done = true; return true }
}

/// Runs `op`, failing with ``NBDTestTimeout`` after `seconds` (even if `op` never returns).
func within<T: Sendable>(_ seconds: Double, _ what: String, _ op: @escaping @Sendable () async throws -> T) async throws -> T {
    let once = NBDTestOnce()
    return try await withCheckedThrowingContinuation { (cont: CheckedContinuation<T, Error>) in
        Task {
            do {
                let v = try await op()
                if once.take() { cont.resume(returning: v) }
            } catch {
                if once.take() { cont.resume(throwing: error) }
            }
        }
        Task {
            try? await Task.sleep(nanoseconds: UInt64(seconds * 1e9))
            if once.take() { cont.resume(throwing: NBDTestTimeout(what: what)) }
        }
    }
}

/// An NBD server (qemu-nbd or nbdkit) running as a child process, stopped on `stop()` or release.
final class NBDTestServer: @unchecked Sendable {
    let process: Process
    let uri: String
    let log: String

    static let haveQemuNBD = Tools.which("qemu-nbd") != nil && Tools.which("qemu-img") != nil
    static let haveNbdkit = Tools.which("nbdkit") != nil

    private init(process: Process, uri: String, log: String) {
        self.process = process
        self.uri = uri
        self.log = log
    }

    deinit { stop() }

    /// A free TCP port on 127.0.0.1 (loopback only).
    static func freePort() -> UInt16 {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        addr.sin_port = 0
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &addr) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { sa -> Int32 in
                _ = bind(fd, sa, len)
                return getsockname(fd, sa, &len)
            }
        }
        return UInt16(bigEndian: addr.sin_port)
    }

    static func canConnectTCP(_ port: UInt16) -> Bool {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        addr.sin_port = port.bigEndian
        return withUnsafePointer(to: &addr) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) == 0 }
        }
    }

    private static func launch(_ tool: String, _ args: [String], dir: TempDir, uri: String,
                               ready: @escaping () -> Bool) throws -> NBDTestServer {
        guard let path = Tools.which(tool) else { throw RunError.notFound(tool) }
        let log = dir.file("\(tool)-\(UUID().uuidString.prefix(8)).log")
        #expect(FileManager.default.createFile(atPath: log, contents: nil))
        let p = Process()
        p.executableURL = URL(fileURLWithPath: path)
        p.arguments = args
        let h = FileHandle(forWritingAtPath: log)
        p.standardOutput = h
        p.standardError = h
        p.standardInput = FileHandle.nullDevice
        try p.run()
        let server = NBDTestServer(process: p, uri: uri, log: log)
        let deadline = Date().addingTimeInterval(15)
        while !ready() {
            if !p.isRunning || Date() > deadline {
                server.stop()
                let text = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
                throw NBDTestTimeout(what: "starting \(tool) \(args.joined(separator: " ")): \(text)")
            }
            usleep(20_000)
        }
        return server
    }

    /// `qemu-nbd` serving `image` over a Unix socket in `dir`, or over 127.0.0.1; with
    /// `persistent: false` (Unix sockets only) it exits cleanly after the first client leaves.
    static func qemuNBD(_ image: String, format: String, readOnly: Bool, dir: TempDir, tcp: Bool = false,
                        exportName: String? = nil, persistent: Bool = true) throws -> NBDTestServer {
        var args = ["-f", format, "--cache=writeback"]
        if persistent || tcp { args.append("-t") }
        if readOnly { args.append("-r") }
        if let exportName { args += ["-x", exportName] }
        let exportPath = exportName.map { "/\($0)" } ?? "/"
        if tcp {
            let port = freePort()
            args += ["-b", "127.0.0.1", "-p", String(port), image]
            return try launch("qemu-nbd", args, dir: dir, uri: "nbd://127.0.0.1:\(port)\(exportPath)") { canConnectTCP(port) }
        }
        let sock = dir.file("qnbd-\(UUID().uuidString.prefix(8)).sock")
        args += ["--socket=\(sock)", image]
        return try launch("qemu-nbd", args, dir: dir, uri: "nbd+unix://\(exportPath)?socket=\(sock)") {
            FileManager.default.fileExists(atPath: sock)
        }
    }

    /// `nbdkit -f -U SOCK ARGS...` (ARGS: filters, the plugin and its parameters).
    static func nbdkit(_ args: [String], dir: TempDir) throws -> NBDTestServer {
        let sock = dir.file("kit-\(UUID().uuidString.prefix(8)).sock")
        let pid = dir.file("kit-\(UUID().uuidString.prefix(8)).pid")
        return try launch("nbdkit", ["-f", "-U", sock, "-P", pid] + args, dir: dir, uri: "nbd+unix:///?socket=\(sock)") {
            FileManager.default.fileExists(atPath: pid) && FileManager.default.fileExists(atPath: sock)
        }
    }

    /// Waits (bounded) for the process to exit.
    @discardableResult
    func waitExit(seconds: Double = 10) -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        while process.isRunning && Date() < deadline { usleep(10_000) }
        return !process.isRunning
    }

    /// SIGTERM, then SIGKILL if it lingers.
    func stop() {
        guard process.isRunning else { return }
        process.terminate()
        // The test runner's threads block most signals and children inherit the mask, so
        // SIGTERM may stay pending: fall back to SIGKILL quickly. (Tests that need a clean
        // exit use a non-persistent qemu-nbd, which exits when the client disconnects.)
        if !waitExit(seconds: 1) {
            kill(process.processIdentifier, SIGKILL)
            waitExit(seconds: 5)
        }
    }

    /// Kills the server without warning.
    func crash() {
        kill(process.processIdentifier, SIGKILL)
        waitExit(seconds: 5)
    }
}

private func fileBytes(_ path: String) throws -> [UInt8] {
    try [UInt8](Data(contentsOf: URL(fileURLWithPath: path)))
}

/// A test image with data, a zeroed run and a hole, made by QEMU's tools.
private func makeImage(_ dir: TempDir, format: String) throws -> String {
    let q = dir.file("src.qcow2")
    try mustRun("qemu-img", "create", "-q", "-f", "qcow2", q, "24M")
    try mustRun("qemu-io", "-c", "write -P 0x5a 1M 3M", "-c", "write -z 8M 1M", "-c", "write -P 0x17 12M 4097",
                "-c", "write -P 0xc3 23M 1M", q)
    if format == "qcow2" { return q }
    let r = dir.file("src.raw")
    try mustRun("qemu-img", "convert", "-O", "raw", q, r)
    return r
}

// MARK: Against qemu-nbd

@Suite(.enabled(if: NBDTestServer.haveQemuNBD, "qemu-nbd not installed (apt-get install qemu-utils); test skipped"), .serialized)
struct NBDClientQemuTests {
    @Test(arguments: ["qcow2", "raw"], [false, true])
    func readsLikeQemuImgConvert(format: String, tcp: Bool) async throws {
        let dir = TempDir("nbdc")
        let image = try makeImage(dir, format: format)
        let oracle = dir.file("oracle.raw")
        try mustRun("qemu-img", "convert", "-O", "raw", image, oracle)
        let expected = try fileBytes(oracle)
        let server = try NBDTestServer.qemuNBD(image, format: format, readOnly: true, dir: dir, tcp: tcp)
        defer { server.stop() }
        let uri = server.uri
        try await within(60, "read through nbd") {
            let node = try await ImageOpener.open(uri, options: OpenOptions(readOnly: true))
            #expect(node.driverName == "raw")
            let nbd = try #require(node.file as? NBDClientNode)
            #expect(nbd.isReadOnly)
            #expect(nbd.info.structuredReplies)
            #expect(nbd.info.baseAllocationID != nil)
            #expect(node.length == Int64(expected.count))
            let got = try await node.read(at: 0, count: expected.count)
            #expect(got == expected)
            // Many requests in flight at once, answered in any order.
            try await withThrowingTaskGroup(of: (Int, [UInt8]).self) { g in
                for i in 0..<64 {
                    let off = (i * 379_123) % (expected.count - 70_000)
                    g.addTask { (off, try await node.read(at: Int64(off), count: 1000 + i * 1000)) }
                }
                for try await (off, bytes) in g {
                    #expect(bytes == Array(expected[off..<(off + bytes.count)]), "concurrent read at \(off)")
                }
            }
            // A read-only export refuses writes.
            await #expect(throws: BlockError.self) { try await node.write(at: 0, bytes: [1, 2, 3]) }
            do { try await nbd.write(at: 0, bytes: [1]) } catch let e as BlockError { #expect(e.code == .readOnly) }
            try await node.close()
        }
    }

    @Test(arguments: ["raw", "qcow2"])
    func writesLandRight(format: String) async throws {
        let dir = TempDir("nbdc")
        let image = try makeImage(dir, format: format)
        let reference = dir.file("reference.\(format)")
        try FileManager.default.copyItem(atPath: image, toPath: reference)
        try mustRun("qemu-io", "-f", format, "-c", "write -P 0x66 100k 300k", "-c", "write -P 0x99 2M 1M",
                    "-c", "write -z 5M 2M", "-c", "write -z -u 1M 512k", "-c", "discard 20M 1M",
                    "-c", "write -P 0x42 12M 17", reference)
        let server = try NBDTestServer.qemuNBD(image, format: format, readOnly: false, dir: dir, persistent: false)
        let uri = server.uri
        try await within(60, "writes through nbd") {
            let node = try await ImageOpener.open(uri, options: OpenOptions(format: "raw"))
            #expect(!node.isReadOnly)
            try await node.write(at: 100 << 10, bytes: [UInt8](repeating: 0x66, count: 300 << 10))
            try await node.write(at: 2 << 20, bytes: [UInt8](repeating: 0x99, count: 1 << 20), flags: .fua)
            try await node.writeZeroes(at: 5 << 20, length: 2 << 20, flags: [])
            try await node.writeZeroes(at: 1 << 20, length: 512 << 10, flags: .mayUnmap)
            try await node.discard(at: 20 << 20, length: 1 << 20)
            try await node.write(at: 12 << 20, bytes: [UInt8](repeating: 0x42, count: 17))
            try await node.flush()
            try await node.close()
        }
        #expect(server.waitExit(seconds: 10), "qemu-nbd did not exit after the client disconnected")
        server.stop()
        let r = try run("qemu-img", "compare", "-f", format, "-F", format, image, reference)
        #expect(r.status == 0, "\(r)")
    }

    /// qcow2 metadata and data written through the NBD client: the image stays consistent.
    @Test func qcow2OverWritableNBD() async throws {
        let dir = TempDir("nbdc")
        let image = dir.file("q.qcow2")
        try mustRun("qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", image, "8M")
        let server = try NBDTestServer.qemuNBD(image, format: "raw", readOnly: false, dir: dir, persistent: false)
        let uri = server.uri
        try await within(60, "qcow2 over nbd") {
            let node = try await ImageOpener.open(uri)
            #expect(node.driverName == "qcow2")
            try await node.write(at: 4096, bytes: [UInt8](repeating: 0xab, count: 70_000))
            try await node.writeZeroes(at: 1 << 20, length: 65536, flags: [])
            try await node.close()
        }
        #expect(server.waitExit(seconds: 10), "qemu-nbd did not exit after the client disconnected")
        server.stop()
        let check = try run("qemu-img", "check", image)
        #expect(check.status == 0, "\(check)")
        let r = try run("qemu-io", "-r", "-c", "read -P 0xab 4096 70000", "-c", "read -P 0 1M 64k", image)
        #expect(r.status == 0 && !r.stdout.contains("Pattern verification failed"), "\(r)")
    }

    @Test(arguments: [["info"], ["info", "--output=json"], ["map", "--output=json"], ["map"]])
    func imgMatchesQemuImg(_ args: [String]) async throws {
        guard Tools.executable("img") != nil else { Issue.record("img tool not built"); return }
        let dir = TempDir("nbdc")
        let image = try makeImage(dir, format: "qcow2")
        for format in ["qcow2", "raw"] {
            let server = try NBDTestServer.qemuNBD(image, format: format, readOnly: true, dir: dir)
            defer { server.stop() }
            let ours = try run("img", args + [server.uri])
            let theirs = try run("qemu-img", args + [server.uri])
            #expect(ours.status == 0 && theirs.status == 0, "\(ours)\n\(theirs)")
            #expect(ours.stdout == theirs.stdout, "img \(args) over an nbd export of \(format)")
        }
    }

    @Test func overlayWithNBDBackingFile() async throws {
        let dir = TempDir("nbdc")
        let base = try makeImage(dir, format: "raw")
        let server = try NBDTestServer.qemuNBD(base, format: "raw", readOnly: true, dir: dir)
        defer { server.stop() }
        let top = dir.file("top.qcow2")
        try mustRun("qemu-img", "create", "-q", "-f", "qcow2", "-b", server.uri, "-F", "raw", top)
        try mustRun("qemu-io", "-c", "write -P 0x31 2M 64k", top)
        let oracle = dir.file("oracle.raw")
        try mustRun("qemu-img", "convert", "-O", "raw", top, oracle)
        let expected = try fileBytes(oracle)
        try await within(60, "overlay on nbd") {
            let node = try await ImageOpener.open(top, options: OpenOptions(readOnly: true))
            #expect(node.backing?.file is NBDClientNode)
            #expect(try await node.read(at: 0, count: expected.count) == expected)
            try await node.close()
        }
        if Tools.executable("img") != nil {
            let ours = try run("img", "map", "--output=json", top)
            let theirs = try run("qemu-img", "map", "--output=json", top)
            #expect(ours.stdout == theirs.stdout)
        }
    }

    @Test func unknownExportAndRefusedConnections() async throws {
        let dir = TempDir("nbdc")
        let image = try makeImage(dir, format: "raw")
        let server = try NBDTestServer.qemuNBD(image, format: "raw", readOnly: true, dir: dir, exportName: "right")
        defer { server.stop() }
        guard case .unix(let sock) = try NBDURI(server.uri).transport else { Issue.record("not unix"); return }
        try await within(30, "error paths") {
            // The right name works, another one is "Requested export not available".
            let ok = try await ImageOpener.open("nbd+unix:///right?socket=\(sock)", options: OpenOptions(readOnly: true))
            try await ok.close()
            do {
                _ = try await ImageOpener.open("nbd+unix:///wrong?socket=\(sock)", options: OpenOptions(readOnly: true))
                Issue.record("opened an unknown export")
            } catch let e as BlockError {
                #expect(e.code == .notFound)
                #expect(e.message.contains("Requested export not available"), "\(e.message)")
            }
            do {
                _ = try await ImageOpener.open("nbd+unix:///?socket=\(dir.file("nothing.sock"))")
                Issue.record("connected to a missing socket")
            } catch let e as BlockError {
                #expect(e.message.contains("Failed to connect to"), "\(e.message)")
            }
            let port = NBDTestServer.freePort()
            do {
                _ = try await ImageOpener.open("nbd://127.0.0.1:\(port)/x")
                Issue.record("connected to a closed port")
            } catch let e as BlockError {
                #expect(e.message.contains("Connection refused"), "\(e.message)")
            }
        }
    }
}

// MARK: Against nbdkit

@Suite(.enabled(if: NBDTestServer.haveNbdkit, "nbdkit not installed (apt-get install nbdkit); test skipped"), .serialized)
struct NBDClientNbdkitTests {
    @Test func memoryAsWritableTarget() async throws {
        let dir = TempDir("nbdc")
        let server = try NBDTestServer.nbdkit(["memory", "64M"], dir: dir)
        defer { server.stop() }
        let uri = server.uri
        try await within(60, "nbdkit memory") {
            let node = try await NBDClientNode.connect(try NBDURI(uri), readOnly: false)
            #expect(node.length == 64 << 20)
            #expect(!node.isReadOnly)
            var rng = SystemRandomNumberGenerator()
            let data = (0..<(3 << 20) + 123).map { _ in UInt8.random(in: 0...255, using: &rng) }
            try await node.write(at: 5_000_001, bytes: data)
            #expect(try await node.read(at: 5_000_001, count: data.count) == data)
            let s = try await node.blockStatus(at: 0, length: 1 << 20)
            #expect(s.flags.contains(.zero) && !s.flags.contains(.data) && s.flags.contains(.allocated))
            let d = try await node.blockStatus(at: 6 << 20, length: 1 << 20)
            #expect(d.flags.contains(.data))
            try await node.writeZeroes(at: 6 << 20, length: 1 << 20, flags: [.mayUnmap, .noFallback])
            #expect(try await node.read(at: 6 << 20, count: 1 << 20) == [UInt8](repeating: 0, count: 1 << 20))
            try await node.discard(at: 0, length: 64 << 20)
            try await node.flush()
            try await node.close()
            // Requests after close fail cleanly.
            await #expect(throws: BlockError.self) { _ = try await node.read(at: 0, count: 1) }
        }
    }

    /// The server's minimum block size is honoured (unaligned requests would fail with EINVAL
    /// under blocksize-error-policy=error) and requests are split to its maximum.
    @Test func blockSizeConstraints() async throws {
        let dir = TempDir("nbdc")
        let server = try NBDTestServer.nbdkit(["--filter=blocksize-policy", "memory", "4M", "blocksize-minimum=4096",
                                               "blocksize-preferred=65536", "blocksize-maximum=65536",
                                               "blocksize-error-policy=error"], dir: dir)
        defer { server.stop() }
        let uri = server.uri
        try await within(180, "block size") {
            let node = try await NBDClientNode.connect(try NBDURI(uri), readOnly: false)
            #expect(node.info.minimumBlockSize == 4096)
            #expect(node.info.maximumBlockSize == 65536)
            var model = [UInt8](repeating: 0, count: 4 << 20)
            var rng = SystemRandomNumberGenerator()
            for _ in 0..<12 {
                let off = Int.random(in: 0..<(4 << 20) - 300_000, using: &rng)
                let n = Int.random(in: 1...300_000, using: &rng)
                let bytes = (0..<n).map { _ in UInt8.random(in: 0...255, using: &rng) }
                try await node.write(at: Int64(off), bytes: bytes)
                model.replaceSubrange(off..<(off + n), with: bytes)
                let zoff = Int.random(in: 0..<(4 << 20) - 20_000, using: &rng)
                let zn = Int.random(in: 1...20_000, using: &rng)
                try await node.writeZeroes(at: Int64(zoff), length: Int64(zn), flags: [])
                model.replaceSubrange(zoff..<(zoff + zn), with: [UInt8](repeating: 0, count: zn))
            }
            #expect(try await node.read(at: 0, count: model.count) == model)
            #expect(try await node.read(at: 12_345, count: 777) == Array(model[12_345..<13_122]))
            let s = try await node.blockStatus(at: 100, length: 5000)
            #expect(s.length >= 1 && s.length <= 5000)
            try await node.close()
        }
    }

    /// With a server minimum block size, an unaligned write is a read-modify-write of its
    /// blocks; an aligned write or a zeroing of the same block running at the same time must
    /// not be undone by it (either order is fine, an old byte outside the patch is not).
    @Test func readModifyWriteDoesNotUndoConcurrentWrites() async throws {
        let dir = TempDir("nbdc")
        // Writes are delayed, so a read-modify-write's stale write can land after a whole-block
        // write sent while its read was in flight.
        let server = try NBDTestServer.nbdkit(["--filter=blocksize-policy", "--filter=delay", "memory", "1M", "blocksize-minimum=4096",
                                               "blocksize-preferred=65536", "blocksize-maximum=65536",
                                               "blocksize-error-policy=error", "delay-write=10ms", "delay-zero=10ms"], dir: dir)
        defer { server.stop() }
        let uri = server.uri
        try await within(180, "read-modify-write") {
            let node = try await NBDClientNode.connect(try NBDURI(uri), readOnly: false)
            let blocks = 32
            for round in 0..<3 {
                let fill = UInt8(round * 2 + 1), patch = UInt8(round * 2 + 2)
                try await withThrowingTaskGroup(of: Void.self) { g in
                    for b in 0..<blocks {
                        let base = Int64(b * 4096)
                        let zero = round > 0 && b % 3 == 0
                        // The patch first: its read goes out before the whole-block request.
                        g.addTask { try await node.write(at: base + 100, bytes: [UInt8](repeating: patch, count: 100)) }
                        g.addTask {
                            if zero { try await node.writeZeroes(at: base, length: 4096, flags: []) } else {
                                try await node.write(at: base, bytes: [UInt8](repeating: fill, count: 4096))
                            }
                        }
                    }
                    try await g.waitForAll()
                }
                let got = try await node.read(at: 0, count: blocks * 4096)
                for b in 0..<blocks {
                    let want: UInt8 = round > 0 && b % 3 == 0 ? 0 : fill
                    let lost = got[(b * 4096)..<((b + 1) * 4096)].enumerated().contains { i, v in (i < 100 || i >= 200) && v != want }
                    #expect(!lost, "round \(round) block \(b): a write was undone by a read-modify-write")
                    if lost { break }
                }
            }
            try await node.close()
        }
    }

    @Test func serverErrorsSurfaceAsBlockErrors() async throws {
        let dir = TempDir("nbdc")
        let server = try NBDTestServer.nbdkit(["--filter=error", "memory", "16M", "error-pread=EIO",
                                               "error-pread-rate=1"], dir: dir)
        defer { server.stop() }
        let uri = server.uri
        try await within(30, "error filter") {
            let node = try await NBDClientNode.connect(try NBDURI(uri), readOnly: false)
            for _ in 0..<3 {
                do {
                    _ = try await node.read(at: 4096, count: 8192)
                    Issue.record("read succeeded despite the error filter")
                } catch let e as BlockError {
                    #expect(e.errno == EIO)
                    #expect(e.code == .io)
                    #expect(e.offset == 4096)
                }
            }
            // Writes still work: the connection survived the errors.
            try await node.write(at: 0, bytes: [1, 2, 3])
            try await node.close()
        }
    }

    @Test func serverKilledMidSessionFailsPendingRequests() async throws {
        let dir = TempDir("nbdc")
        let server = try NBDTestServer.nbdkit(["--filter=delay", "memory", "16M", "rdelay=5"], dir: dir)
        let uri = server.uri
        let node = try await within(20, "connect") { try await NBDClientNode.connect(try NBDURI(uri), readOnly: false) }
        let started = Date()
        try await within(20, "pending requests fail") {
            try await withThrowingTaskGroup(of: BlockError?.self) { g in
                for i in 0..<8 {
                    g.addTask {
                        do { _ = try await node.read(at: Int64(i) * 65536, count: 65536); return nil } catch let e as BlockError { return e }
                    }
                }
                try await Task.sleep(nanoseconds: 300_000_000)
                server.crash()
                for try await e in g {
                    #expect(e != nil, "a read succeeded although the server was killed")
                    if let e { #expect(e.code == .io, "\(e)") }
                }
            }
            // Later requests fail at once, too.
            await #expect(throws: BlockError.self) { _ = try await node.read(at: 0, count: 512) }
            await #expect(throws: BlockError.self) { try await node.write(at: 0, bytes: [1]) }
            try? await node.close()
        }
        #expect(Date().timeIntervalSince(started) < 5, "pending requests waited for the delay instead of failing")
    }
}
