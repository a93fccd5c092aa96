#if canImport(Glibc)
import Glibc
#endif
import QBlock
import Foundation

/// Where a serial port's output goes and its input comes from (QEMU's chardev).
public protocol SerialBackend: AnyObject, Sendable {
    /// Bytes the guest transmits.
    func write(_ bytes: UnsafeRawBufferPointer)
    /// Starts delivering input bytes to `receiver` (from a thread of the backend's own).
    func startInput(_ receiver: @escaping @Sendable ([UInt8]) -> Void)
    /// Stops input and releases what the backend holds (terminal modes, sockets).
    func close()
}

/// A backend over file descriptors: stdio (`--serial stdio`), a connected socket, or
/// output only (tests). Input is read on a dedicated thread.
// @unchecked: `savedTermios`, `stopPipe` and `started` are only touched with `lock` held; the
// descriptors are immutable.
public final class FDSerialBackend: SerialBackend, @unchecked Sendable {
    private let inFD: Int32
    private let outFD: Int32
    private let ownsFDs: Bool
    private let lock = PosixMutex()
    private var savedTermios: termios?
    private var stopPipe: [Int32] = [-1, -1]
    private var started = false

    /// - Parameters:
    ///   - input: descriptor to read guest input from, or -1 for none.
    ///   - output: descriptor the guest's output is written to.
    ///   - rawTerminal: when `input` is a terminal, turn off line editing and echo while
    ///     the machine runs (signals stay on, so Ctrl-C still ends the tool).
    public init(input: Int32, output: Int32, ownsFDs: Bool = false, rawTerminal: Bool = true) {
        inFD = input
        outFD = output
        self.ownsFDs = ownsFDs
        if rawTerminal, input >= 0, isatty(input) != 0 {
            var t = termios()
            if tcgetattr(input, &t) == 0 {
                savedTermios = t
                var raw = t
                raw.c_lflag &= ~tcflag_t(ICANON | ECHO | IEXTEN)
                raw.c_iflag &= ~tcflag_t(ICRNL | IXON)
                tcsetattr(input, TCSANOW, &raw)
            }
        }
    }

    /// The tool's standard input and output.
    public static func stdio() -> FDSerialBackend { FDSerialBackend(input: 0, output: 1) }

    /// Writes all of `bytes` to the output descriptor, retrying short writes and `EINTR`;
    /// other errors drop the rest (a serial port has nowhere to report them).
    public func write(_ bytes: UnsafeRawBufferPointer) {
        guard var p = bytes.baseAddress else { return }
        var left = bytes.count
        while left > 0 {
            let n = Glibc.write(outFD, p, left)
            if n < 0 { if errno == EINTR { continue }; return }
            left -= n
            p += n
        }
    }

    /// Starts the input thread (once): puts a terminal into raw mode and calls `receiver`
    /// with each chunk read until ``close()`` or end of input.
    public func startInput(_ receiver: @escaping @Sendable ([UInt8]) -> Void) {
        guard inFD >= 0 else { return }
        // The stop descriptor is read under the lock too: `close()` may run on another thread.
        let stopFD: Int32? = lock.withLock {
            if started { return nil }
            started = true
            // SAFETY: `stopPipe` has two elements, as pipe(2) needs.
            stopPipe.withUnsafeMutableBufferPointer { _ = pipe($0.baseAddress!) }
            return stopPipe[0]
        }
        guard let stopFD else { return }
        let fd = inFD
        let t = Thread {
            var buf = [UInt8](repeating: 0, count: 256)
            while true {
                var fds = [pollfd(fd: fd, events: Int16(POLLIN), revents: 0), pollfd(fd: stopFD, events: Int16(POLLIN), revents: 0)]
                let r = poll(&fds, 2, -1)
                if r < 0 { if errno == EINTR { continue }; return }
                if fds[1].revents != 0 { return }
                if fds[0].revents & Int16(POLLIN | POLLHUP | POLLERR) == 0 { continue }
                // SAFETY: read(2) is told `buf`'s own count.
                let n = buf.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
                if n < 0 { if errno == EINTR || errno == EAGAIN { continue }; return }
                if n == 0 { return } // end of input
                receiver(Array(buf[0..<n]))
            }
        }
        t.name = "serial-input"
        t.start()
    }

    /// Stops the input thread, restores the terminal mode and closes descriptors this backend owns.
    public func close() {
        lock.withLock {
            if stopPipe[1] >= 0 {
                var b: UInt8 = 1
                _ = Glibc.write(stopPipe[1], &b, 1)
            }
            if var t = savedTermios {
                tcsetattr(inFD, TCSANOW, &t)
                savedTermios = nil
            }
            if ownsFDs {
                if inFD >= 0 { Glibc.close(inFD) }
                if outFD >= 0 && outFD != inFD { Glibc.close(outFD) }
            }
        }
    }

    /// Connects to a listening Unix socket (`--serial unix:PATH`, as QEMU's client mode).
    /// - Throws: `.io` when the socket cannot be reached.
    public static func unixSocket(path: String) throws -> FDSerialBackend {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw MachineError(.io, "cannot create a socket: \(String(cString: strerror(errno)))", operation: "open serial") }
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: addr.sun_path) else {
            Glibc.close(fd)
            throw MachineError(.invalidArgument, "socket path too long: \(path)", operation: "open serial")
        }
        // SAFETY: the path length was checked against `sun_path` above, so it and its NUL fit.
        withUnsafeMutableBytes(of: &addr.sun_path) { p in
            for (i, c) in bytes.enumerated() { p[i] = c }
            p[bytes.count] = 0
        }
        let r = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard r == 0 else {
            let e = String(cString: strerror(errno))
            Glibc.close(fd)
            throw MachineError(.io, "cannot connect to serial socket '\(path)': \(e)", operation: "open serial")
        }
        return FDSerialBackend(input: fd, output: fd, ownsFDs: true, rawTerminal: false)
    }
}

/// Collects output in memory (tests).
// @unchecked: `data` and `receiver` are only touched with `lock` held.
public final class BufferSerialBackend: SerialBackend, @unchecked Sendable {
    private let lock = PosixMutex()
    private var data: [UInt8] = []
    private var receiver: (@Sendable ([UInt8]) -> Void)?
    /// Creates an empty buffer.
    public init() {}
    /// Appends `bytes` to ``output``.
    public func write(_ bytes: UnsafeRawBufferPointer) { lock.withLock { data.append(contentsOf: bytes) } }
    /// Keeps `receiver` for ``type(_:)``; no thread is started.
    public func startInput(_ receiver: @escaping @Sendable ([UInt8]) -> Void) { lock.withLock { self.receiver = receiver } }
    /// Does nothing: there is nothing to release.
    public func close() {}
    /// Everything written so far.
    public var output: [UInt8] { lock.withLock { data } }
    /// Everything written so far, decoded as UTF-8.
    public var text: String { String(decoding: output, as: UTF8.self) }
    /// Feeds input as if typed.
    public func type(_ bytes: [UInt8]) { lock.withLock { receiver }?(bytes) }
}
