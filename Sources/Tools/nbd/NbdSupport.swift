import ArgumentParser
import Foundation
import QBlock
import ToolSupport
#if canImport(Glibc)
import Glibc
#endif

/// `--fork`: the parent re-executes this program as a detached child (a fresh process,
/// rather than fork() in a process whose runtime already has threads) and waits until the
/// child listens. The child's standard error is a pipe to the parent; the child writes a
/// NUL byte there once it is ready and then points its standard error at /dev/null, so
/// the parent sees either the NUL (exit 0) or the child's error message and its exit.
enum Daemon {
    static let environmentKey = "QBLOCK_NBD_DAEMON_CHILD"

    /// Set in the child.
    static var readyFD: Int32? {
        ProcessInfo.processInfo.environment[environmentKey] == "1" ? 2 : nil
    }

    static func spawnAndWait() -> Int32 {
        let proc = Process()
        let exe = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? "/proc/self/exe"
        proc.executableURL = URL(fileURLWithPath: exe)
        proc.arguments = Array(CommandLine.arguments.dropFirst())
        var env = ProcessInfo.processInfo.environment
        env[environmentKey] = "1"
        proc.environment = env
        let pipe = Pipe()
        proc.standardError = pipe
        proc.standardOutput = FileHandle.nullDevice
        proc.standardInput = FileHandle.nullDevice
        do {
            try proc.run()
        } catch {
            tool.printError("Failed to fork: \(error)")
            return 1
        }
        try? pipe.fileHandleForWriting.close()
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        if let last = data.last, last == 0 {
            writeStderr(String(decoding: data.dropLast(), as: UTF8.self))
            return 0
        }
        writeStderr(String(decoding: data, as: UTF8.self))
        proc.waitUntilExit()
        return proc.terminationStatus == 0 ? 1 : proc.terminationStatus
    }

    /// In the child: tells the parent that the server listens, and detaches from its pipe.
    static func signalReady() {
        guard readyFD != nil else { return }
        var zero: UInt8 = 0
        _ = Glibc.write(2, &zero, 1)
        let null = open("/dev/null", O_RDWR)
        if null >= 0 {
            dup2(null, 2)
            dup2(null, 1)
            dup2(null, 0)
            if null > 2 { close(null) }
        }
    }
}

/// Calls `handler` on SIGTERM, SIGINT or SIGHUP (the server then shuts down cleanly:
/// requests in flight finish, the image is flushed and closed, the socket file removed).
final class SignalWatcher {
    private var sources: [DispatchSourceSignal] = []

    init(_ handler: @escaping @Sendable () -> Void) {
        for sig in [SIGTERM, SIGINT, SIGHUP] {
            signal(sig, SIG_IGN)
            let s = DispatchSource.makeSignalSource(signal: sig, queue: .global())
            s.setEventHandler(handler: handler)
            s.resume()
            sources.append(s)
        }
    }

    func cancel() {
        for s in sources { s.cancel() }
    }
}
