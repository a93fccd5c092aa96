import Foundation
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

/// Runs `nbd --qmp` daemons and drives them with the real `qemu.qmp` Python client
/// (`Tests/Scripts/python/qmp_drive.py`), for the QMP test suites.
enum QMPHarness {
    static let pythonDir = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent("Tests/Scripts/python").path

    /// Whether python3 with qemu.qmp is there (`make test` installs it).
    static let havePython: Bool = {
        guard let py = Tools.which("python3") else { return false }
        return (try? run(py, ["-c", "import qemu.qmp"]))?.status == 0
    }()
    static let ready = havePython && Tools.qemuAvailable && Tools.executable("nbd") != nil
    static let missing = "needs python3 with qemu.qmp (pip install qemu.qmp; make test does it), qemu-img and the built nbd tool; skipped"

    struct Daemon {
        let pid: pid_t
        let socket: String
        let log: String

        /// Sends SIGTERM (if still running) and reaps the process; returns its exit status.
        @discardableResult
        func stop() -> Int32 {
            kill(pid, SIGTERM)
            return NBDHarness.reap(pid)
        }
    }

    /// A plain connected Unix socket to `path` (for raw protocol abuse).
    static func rawClient(_ path: String) throws -> Int32 {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { p in
            let b = Array(path.utf8)
            p.copyBytes(from: b)
            p[b.count] = 0
        }
        let r = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard fd >= 0, r == 0 else { throw QMPTestError(description: "cannot connect to \(path)") }
        return fd
    }

    /// The usual transcript fixture: base.qcow2 ← top.qcow2 with 64 KiB written, an 8 MiB r.raw.
    static func standardFixture(_ dir: TempDir) throws {
        try mustRun("qemu-img", "create", "-q", "-f", "qcow2", dir.file("base.qcow2"), "16M")
        try mustRun("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", dir.file("top.qcow2"))
        try mustRun("qemu-io", "-c", "write 0 64k", dir.file("top.qcow2"))
        try truncateFile(dir.file("r.raw"), to: 8 << 20)
    }

    /// Replays `script` (Tests/Scripts/python, through qmp_transcript.py) on a fresh daemon started
    /// in `dir` after `setup`; `daemon` is its argv with `$SOCK` for the socket. Returns the
    /// transcript with `dir` written as `$DIR`, so two daemons' transcripts compare.
    static func transcript(daemon: [String], script: String, dir: TempDir = TempDir("qmp-transcript"),
                           setup: (TempDir) throws -> Void = standardFixture) throws -> String {
        try setup(dir)
        let socket = dir.file("qmp.sock")
        guard let pid = NBDHarness.spawn(daemon.map { $0.replacingOccurrences(of: "$SOCK", with: socket) }, output: dir.file("log")) else {
            throw QMPTestError(description: "cannot start \(daemon[0])")
        }
        defer { kill(pid, SIGTERM); _ = NBDHarness.reap(pid) }
        let deadline = Date().addingTimeInterval(10)
        while !FileManager.default.fileExists(atPath: socket) && Date() < deadline { usleep(10_000) }
        usleep(50_000)
        let r = try run(Tools.which("python3") ?? "python3", ["\(pythonDir)/qmp_transcript.py", socket, "\(pythonDir)/\(script)", dir.path])
        guard r.status == 0 else { throw QMPTestError(description: "transcript failed: \(r)") }
        return r.stdout.replacingOccurrences(of: dir.path, with: "$DIR")
    }

    /// Starts `nbd --qmp SOCKET [args]` and waits until the socket exists.
    static func startDaemon(dir: TempDir, tag: String = "qmp", args: [String] = []) throws -> Daemon {
        let socket = dir.file("\(tag).sock"), log = dir.file("\(tag).log")
        guard let pid = NBDHarness.spawn([Tools.executable("nbd") ?? "nbd", "--qmp", socket] + args, output: log) else {
            throw NBDStartFailed(description: "nbd --qmp could not be started")
        }
        let deadline = Date().addingTimeInterval(10)
        while !FileManager.default.fileExists(atPath: socket) {
            var status: Int32 = 0
            if waitpid(pid, &status, WNOHANG) == pid || Date() > deadline {
                kill(pid, SIGKILL)
                throw NBDStartFailed(description: "nbd --qmp did not start: \((try? String(contentsOfFile: log, encoding: .utf8)) ?? "")")
            }
            usleep(10_000)
        }
        usleep(20_000)
        return Daemon(pid: pid, socket: socket, log: log)
    }
}

/// A `qmp_drive.py` child: one QMP command per call through `qemu.qmp.QMPClient`.
final class PyQMP: @unchecked Sendable {
    private let proc = Process()
    private let input = Pipe()
    private let output = Pipe()
    private var pending = Data()

    init(socket: String) throws {
        proc.executableURL = URL(fileURLWithPath: Tools.which("python3") ?? "/usr/bin/python3")
        proc.arguments = ["\(QMPHarness.pythonDir)/qmp_drive.py", socket]
        proc.standardInput = input
        proc.standardOutput = output
        proc.standardError = FileHandle.standardError
        try proc.run()
        _ = try readLine()  // the greeting marker
    }

    deinit {
        try? input.fileHandleForWriting.close()
        proc.waitUntilExit()
    }

    private func readLine() throws -> String {
        while true {
            if let nl = pending.firstIndex(of: 0x0A) {
                let line = String(decoding: pending[pending.startIndex..<nl], as: UTF8.self)
                pending = Data(pending[(nl + 1)...])
                return line
            }
            let chunk = output.fileHandleForReading.availableData
            if chunk.isEmpty { throw QMPTestError(description: "qmp_drive.py: end of output") }
            pending.append(chunk)
        }
    }

    /// Runs `name` with `arguments` (a JSON object text); returns the reply as a dictionary
    /// (`return` or `error`).
    func execute(_ name: String, _ arguments: [String: Any]? = nil) async throws -> [String: Any] {
        var req: [String: Any] = ["execute": name]
        if let arguments { req["arguments"] = arguments }
        return try await send(req)
    }

    func waitEvent(_ name: String, timeout: Double = 5) async throws -> [String: Any] {
        try await send(["wait-event": name, "timeout": timeout])
    }

    private func send(_ req: [String: Any]) async throws -> [String: Any] {
        var data = try JSONSerialization.data(withJSONObject: req)
        data.append(0x0A)
        input.fileHandleForWriting.write(data)
        let line: Result<String, Error> = await IOThreadPool.shared.run { Result { try self.readLine() } }
        let text = try line.get()
        return (try JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any]) ?? [:]
    }

    /// Executes and fails unless the reply is a `return`.
    @discardableResult
    func ok(_ name: String, _ arguments: [String: Any]? = nil) async throws -> Any {
        let r = try await execute(name, arguments)
        guard let v = r["return"] else {
            throw QMPTestError(description: "\(name) failed: \(r)")
        }
        return v
    }
}

/// A client writing 4 KiB blocks through an NBD export, several requests in flight, keeping a
/// model of what each block must hold and the longest time a write took.
final class ModelWriter: @unchecked Sendable {
    static let block = 4096
    let node: NBDClientNode
    let blocks: Int
    private let lock = NSLock()
    private(set) var model: [UInt8]
    private(set) var writes = 0
    private(set) var maxLatency: Double = 0
    private var stopFlag = false
    private var task: Task<Error?, Never>?

    init(uri: String, blocks: Int) async throws {
        node = try await NBDClientNode.connect(try NBDURI(uri), readOnly: false)
        self.blocks = blocks
        model = [UInt8](repeating: 0, count: blocks)
    }

    /// Starts `lanes` concurrent writers; lane k owns the blocks b with b % lanes == k and
    /// writes them one at a time, so the model stays exact with requests in flight at once.
    func start(seed: UInt64, lanes: Int = 4) {
        task = Task {
            await withTaskGroup(of: Error?.self) { group in
                for lane in 0..<lanes {
                    group.addTask { await self.lane(lane, of: lanes, seed: seed &+ UInt64(lane)) }
                }
                for await e in group where e != nil { return e }
                return nil
            }
        }
    }

    private func lane(_ lane: Int, of lanes: Int, seed: UInt64) async -> Error? {
        var rng = seed
        var i = lane
        let owned = (blocks - lane + lanes - 1) / lanes
        while !lock.withLock({ stopFlag }) {
            rng = rng &* 6364136223846793005 &+ 1442695040888963407
            let b = Int((rng >> 33) % UInt64(owned)) * lanes + lane
            let value = UInt8(i % 251 + 1)
            let t0 = DispatchTime.now().uptimeNanoseconds
            do {
                try await node.write(at: Int64(b * ModelWriter.block), bytes: [UInt8](repeating: value, count: ModelWriter.block))
            } catch {
                return error
            }
            let dt = Double(DispatchTime.now().uptimeNanoseconds - t0) / 1e9
            lock.withLock {
                model[b] = value
                writes += 1
                maxLatency = max(maxLatency, dt)
            }
            i += lanes
        }
        return nil
    }

    /// Stops writing; returns the writer's error, if any.
    func stop() async -> Error? {
        lock.withLock { stopFlag = true }
        return await task?.value ?? nil
    }

    /// Blocks whose content differs from the model, read back through the export.
    func mismatches() async throws -> [Int] {
        var bad: [Int] = []
        for b in 0..<blocks {
            let data = try await node.read(at: Int64(b * ModelWriter.block), count: ModelWriter.block)
            if data.contains(where: { $0 != model[b] }) { bad.append(b) }
        }
        return bad
    }

    /// The model as a raw image file (for qemu-img compare).
    func writeModel(to path: String) throws {
        var bytes = [UInt8]()
        bytes.reserveCapacity(blocks * ModelWriter.block)
        for v in model { bytes.append(contentsOf: [UInt8](repeating: v, count: ModelWriter.block)) }
        try Data(bytes).write(to: URL(fileURLWithPath: path))
    }
}

struct QMPTestError: Error, CustomStringConvertible {
    let description: String
}
