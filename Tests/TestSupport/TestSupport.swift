// Shared fixtures for the test suites: temporary directories, running the built tools
// and QEMU's, and knowing whether QEMU's tools are there.
import Foundation
import QBlock

/// A temporary directory removed when the value is released.
// @unchecked Sendable: the only stored property is an immutable String.
public final class TempDir: @unchecked Sendable {
    public let path: String

    public init(_ label: String = "qblock-test") {
        let base = ProcessInfo.processInfo.environment["TMPDIR"] ?? "/tmp"
        var template = Array("\(base)/\(label).XXXXXX".utf8CString)
        let made = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
        path = made.map { String(cString: $0) } ?? "\(base)/\(label).\(getpid()).\(UInt32.random(in: 0...UInt32.max))"
        if made == nil { try? FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true) }
    }

    deinit { try? FileManager.default.removeItem(atPath: path) }

    /// The path of `name` inside the directory.
    public func file(_ name: String) -> String { "\(path)/\(name)" }
}

/// What a finished process left behind.
public struct RunResult: Sendable, CustomStringConvertible {
    public var status: Int32
    public var stdout: String
    public var stderr: String
    public var description: String { "exit \(status)\nstdout:\n\(stdout)\nstderr:\n\(stderr)" }
}

public enum Tools {
    /// Whether QEMU's qemu-img and qemu-io are installed.
    public static let qemuAvailable: Bool = which("qemu-img") != nil && which("qemu-io") != nil

    /// The message tests print when they skip for want of QEMU.
    public static let qemuMissing = "qemu-img/qemu-io not installed (apt-get install qemu-utils); interop test skipped"

    /// Finds an executable on PATH.
    public static func which(_ name: String) -> String? {
        let path = ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin"
        for dir in path.split(separator: ":") {
            let p = "\(dir)/\(name)"
            if FileManager.default.isExecutableFile(atPath: p) { return p }
        }
        return nil
    }

    /// The directory holding this build's executables (`img`, `io`): found from the test
    /// bundle's location, so any `--scratch-path` works; `QBLOCK_BIN` overrides.
    public static let binDirectory: String? = {
        let fm = FileManager.default
        if let env = ProcessInfo.processInfo.environment["QBLOCK_BIN"] { return env }
        var candidates: [String] = []
        // The test runner lives in <scratch>/<triple>/<config>/ (…xctest or …PackageTests).
        var dir = URL(fileURLWithPath: CommandLine.arguments.first ?? "").deletingLastPathComponent()
        for _ in 0..<4 {
            candidates.append(dir.path)
            dir = dir.deletingLastPathComponent()
        }
        if let b = Bundle.allBundles.first(where: { $0.bundlePath.hasSuffix(".xctest") }) {
            candidates.append(URL(fileURLWithPath: b.bundlePath).deletingLastPathComponent().path)
        }
        // Fall back to the package's own scratch folders.
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        if let entries = try? fm.contentsOfDirectory(atPath: root.path) {
            for e in entries.sorted() where e.hasPrefix(".build") {
                candidates.append("\(root.path)/\(e)/debug")
                candidates.append("\(root.path)/\(e)/release")
            }
        }
        return candidates.first { fm.isExecutableFile(atPath: "\($0)/img") }
    }()

    /// The path of one of this package's executables.
    public static func executable(_ tool: String) -> String? {
        guard let dir = binDirectory else { return nil }
        let p = "\(dir)/\(tool)"
        return FileManager.default.isExecutableFile(atPath: p) ? p : nil
    }
}

public enum RunError: Error, CustomStringConvertible {
    case notFound(String)
    public var description: String {
        switch self {
        case .notFound(let t): return "executable '\(t)' not found (build it first: swift build)"
        }
    }
}

/// Runs `tool` — "img" or "io" (this package's), or any other name on PATH (qemu-img) —
/// with `args`, in `cwd` when given, and returns its exit status and output.
public func run(_ tool: String, _ args: [String], cwd: String? = nil) throws -> RunResult {
    let path: String
    if tool == "img" || tool == "io" {
        guard let p = Tools.executable(tool) else { throw RunError.notFound(tool) }
        path = p
    } else {
        guard let p = tool.hasPrefix("/") ? tool : Tools.which(tool) else { throw RunError.notFound(tool) }
        path = p
    }
    let proc = Process()
    proc.executableURL = URL(fileURLWithPath: path)
    proc.arguments = args
    if let cwd { proc.currentDirectoryURL = URL(fileURLWithPath: cwd) }
    let outPipe = Pipe(), errPipe = Pipe()
    proc.standardOutput = outPipe
    proc.standardError = errPipe
    proc.standardInput = FileHandle.nullDevice
    try proc.run()
    // Read both pipes while the process runs, so a full pipe never blocks it.
    // @unchecked Sendable: `data` is written by the reader before `group.leave()` and read
    // only after `group.wait()`.
    final class Box: @unchecked Sendable { var data = Data() }
    let errBox = Box()
    let group = DispatchGroup()
    group.enter()
    DispatchQueue.global().async {
        errBox.data = errPipe.fileHandleForReading.readDataToEndOfFile()
        group.leave()
    }
    let outData = outPipe.fileHandleForReading.readDataToEndOfFile()
    group.wait()
    let errData = errBox.data
    proc.waitUntilExit()
    return RunResult(status: proc.terminationStatus,
                     stdout: String(decoding: outData, as: UTF8.self),
                     stderr: String(decoding: errData, as: UTF8.self))
}

/// `run(...)` for tests: a shell-like variadic form.
public func run(_ tool: String, _ args: String..., cwd: String? = nil) throws -> RunResult {
    try run(tool, args, cwd: cwd)
}

/// qemu-img's stderr with "qemu-img:" written as "img:", to compare with our tool's.
public func asImg(_ qemuStderr: String) -> String {
    qemuStderr.replacingOccurrences(of: "qemu-img:", with: "img:")
        .replacingOccurrences(of: "Try 'qemu-img --help'", with: "Try 'img --help'")
}

/// Writes `bytes` at `offset` of the file at `path` (creating it), for building test images.
public func writeFile(_ path: String, at offset: Int64, _ bytes: [UInt8]) throws {
    if !FileManager.default.fileExists(atPath: path) { _ = FileManager.default.createFile(atPath: path, contents: nil) }
    guard let h = FileHandle(forWritingAtPath: path) else { throw RunError.notFound(path) }
    defer { try? h.close() }
    try h.seek(toOffset: UInt64(offset))
    try h.write(contentsOf: Data(bytes))
}

/// Sets the file's length (sparse when growing).
public func truncateFile(_ path: String, to length: Int64) throws {
    if !FileManager.default.fileExists(atPath: path) { _ = FileManager.default.createFile(atPath: path, contents: nil) }
    guard truncate(path, off_t(length)) == 0 else { throw RunError.notFound(path) }
}

/// Writes `bytes` to `node` at `offset` (through an aligned buffer, for async I/O).
public func write(_ node: any BlockDriver, at offset: Int64, _ bytes: [UInt8]) async throws {
    let buf = AlignedBuffer(count: bytes.count)
    buf.withUnsafeMutableBytes { $0.copyBytes(from: bytes) }
    try await buf.withUnsafeBytes { try await node.write(at: offset, from: $0, flags: []) }
}

/// Reads `count` bytes of `node` at `offset`.
public func read(_ node: any BlockDriver, at offset: Int64, count: Int) async throws -> [UInt8] {
    let buf = AlignedBuffer(count: count)
    try await buf.withUnsafeMutableBytes { try await node.read(at: offset, into: $0) }
    return buf.bytes
}

public struct CommandFailed: Error, CustomStringConvertible {
    public let command: String
    public let result: RunResult
    public var description: String { "\(command) failed: \(result)" }
}

/// Runs a command that must succeed (building fixtures); throws with its output if not.
@discardableResult
public func mustRun(_ tool: String, _ args: String..., cwd: String? = nil) throws -> RunResult {
    let r = try run(tool, args, cwd: cwd)
    if r.status != 0 { throw CommandFailed(command: ([tool] + args).joined(separator: " "), result: r) }
    return r
}

/// A value behind a lock, for tests that collect results from callbacks running on other
/// threads.
public final class LockedValue<Value>: @unchecked Sendable {
    // @unchecked: `value` is only read or written with `lock` held.
    private let lock = NSLock()
    private var value: Value

    public init(_ value: Value) { self.value = value }

    /// Runs `body` with the value, the lock held.
    public func withLock<R>(_ body: (inout Value) throws -> R) rethrows -> R {
        lock.lock()
        defer { lock.unlock() }
        return try body(&value)
    }

    /// A copy of the current value.
    public var current: Value { withLock { $0 } }
}
