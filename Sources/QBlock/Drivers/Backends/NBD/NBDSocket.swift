#if canImport(Glibc)
import Glibc
#endif
import QBlockCore

/// A connected stream socket with blocking calls. Every call blocks its thread, so callers
/// run them on ``IOThreadPool`` or on the NBD client's own reader thread, never on the
/// cooperative pool. Every system call goes through ``SocketCalls`` (the seam the NBD server
/// uses too), which retries `EINTR` and lets a test's ``SocketCalls/withInjector(path:_:_:)``
/// fail the connections made to a Unix socket path.
///
/// Ownership: the socket owns its descriptor; ``shutdown()`` wakes blocked readers and
/// writers (they see end of file or `EPIPE`); ``close()`` releases the descriptor once,
/// after every thread that used it has stopped.
// @unchecked: `closed` is only touched with `lock` held; `fd` is immutable (closed once, under the
// lock).
final class NBDSocket: @unchecked Sendable {
    private let fd: Int32
    private let lock = PosixMutex()
    private var closed = false

    private init(fd: Int32) { self.fd = fd }

    deinit { close() }

    /// Connects to the export's endpoint (blocking).
    /// - Throws: ``BlockError`` worded like QEMU's "Failed to connect to '…': Connection refused".
    static func connect(_ uri: NBDURI) throws -> NBDSocket {
        let endpoint = uri.endpoint
        let r: Result<Int32, SocketCalls.ConnectError>
        switch uri.transport {
        case .unix(let path): r = SocketCalls.connectUnix(path: path)
        case .tcp(let host, let port): r = SocketCalls.connectTCP(host: host, port: port)
        }
        switch r {
        case .success(let fd):
            return NBDSocket(fd: fd)
        case .failure(.system(let e)) where e.rawValue == ENAMETOOLONG && uri.isUnix:
            throw BlockError(.invalidArgument, "Failed to connect to '\(endpoint)': socket path is too long", path: endpoint,
                             operation: "connect")
        case .failure(.system(let e)):
            var err = BlockError.system(e.rawValue, "connect", path: endpoint)
            err.message = "Failed to connect to '\(endpoint)': \(BlockError.strerror(e.rawValue))"
            throw err
        case .failure(.resolution(let why)):
            throw BlockError(.notFound, "address resolution failed for \(endpoint): \(why)", path: endpoint, operation: "connect")
        }
    }

    /// Bounds every blocking receive (for the handshake); 0 removes the bound.
    func setReceiveTimeout(seconds: Int) {
        SocketCalls.setReceiveTimeout(fd, seconds: seconds)
    }

    /// Reads exactly `count` bytes into `p`.
    /// - Returns: nil on success, else the errno (0 for end of file before `count` bytes).
    func readExactly(_ p: UnsafeMutableRawPointer, _ count: Int) -> Int32? {
        switch SocketCalls.recvExactly(fd, p, count) {
        case .success(true): return nil
        case .success(false): return 0
        case .failure(let e): return e.rawValue
        }
    }

    /// Reads exactly `count` bytes into a new array, or returns the errno (0: end of file).
    func readExactly(_ count: Int) -> Result<[UInt8], NBDSocketError> {
        if count == 0 { return .success([]) }
        var b = [UInt8](repeating: 0, count: count)
        // SAFETY: `b` has `count` (> 0) bytes, so `baseAddress` is non-nil and valid for the read.
        let r = b.withUnsafeMutableBytes { readExactly($0.baseAddress!, count) }
        if let r { return .failure(NBDSocketError(errno: r)) }
        return .success(b)
    }

    /// Writes all of `count` bytes at `p` (never raising SIGPIPE).
    /// - Returns: nil on success, else the errno.
    func writeAll(_ p: UnsafeRawPointer, _ count: Int) -> Int32? {
        if count == 0 { return nil }
        if case .failure(let e) = SocketCalls.sendAll(fd, [UnsafeRawBufferPointer(start: p, count: count)]) { return e.rawValue }
        return nil
    }

    /// Writes all of `bytes` (never raising SIGPIPE).
    /// - Returns: nil on success, else the errno.
    func writeAll(_ bytes: [UInt8]) -> Int32? {
        if bytes.isEmpty { return nil }
        // SAFETY: `bytes` is non-empty, so `baseAddress` is non-nil and valid for `count` bytes during
        // the call.
        return bytes.withUnsafeBytes { writeAll($0.baseAddress!, $0.count) }
    }

    /// Wakes every thread blocked on the socket; later calls fail.
    func shutdown() {
        lock.withLock {
            if !closed { SocketCalls.shutdown(fd) }
        }
    }

    /// Releases the descriptor (once).
    func close() {
        lock.withLock {
            if closed { return }
            closed = true
            SocketCalls.close(fd)
        }
    }
}

/// A socket failure: an errno, or 0 for the peer closing the connection.
struct NBDSocketError: Error, Sendable {
    var errno: Int32
}

extension NBDURI {
    /// Whether the export is reached over a Unix socket.
    var isUnix: Bool {
        if case .unix = transport { return true }
        return false
    }
}
