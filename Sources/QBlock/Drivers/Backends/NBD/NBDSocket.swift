#if canImport(Glibc)
import Glibc
#endif
import QBlockCore

/// A connected stream socket with blocking calls. Every call blocks its thread, so callers
/// run them on ``IOThreadPool`` or on the NBD client's own reader thread, never on the
/// cooperative pool. `EINTR` is retried here, in one place.
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
        switch uri.transport {
        case .unix(let path): return try connectUnix(path: path, endpoint: uri.endpoint)
        case .tcp(let host, let port): return try connectTCP(host: host, port: port, endpoint: uri.endpoint)
        }
    }

    private static func failure(_ err: Int32, _ endpoint: String) -> BlockError {
        var e = BlockError.system(err, "connect", path: endpoint)
        e.message = "Failed to connect to '\(endpoint)': \(BlockError.strerror(err))"
        return e
    }

    private static func connectUnix(path: String, endpoint: String) throws -> NBDSocket {
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        let capacity = MemoryLayout.size(ofValue: addr.sun_path)
        guard bytes.count < capacity else {
            throw BlockError(.invalidArgument, "Failed to connect to '\(endpoint)': socket path is too long", path: endpoint,
                             operation: "connect")
        }
        // SAFETY: the path length was checked against `sun_path` above, so it and its NUL fit.
        withUnsafeMutableBytes(of: &addr.sun_path) { p in
            p.copyBytes(from: bytes)
            p[bytes.count] = 0
        }
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw failure(errno, endpoint) }
        let sock = NBDSocket(fd: fd)
        let r: Int32 = withUnsafePointer(to: &addr) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { sa in
                retryingEINTR { Glibc.connect(fd, sa, socklen_t(MemoryLayout<sockaddr_un>.size)) }
            }
        }
        guard r == 0 else {
            let e = errno
            sock.close()
            throw failure(e, endpoint)
        }
        return sock
    }

    private static func connectTCP(host: String, port: UInt16, endpoint: String) throws -> NBDSocket {
        var hints = addrinfo()
        hints.ai_family = AF_UNSPEC
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        var list: UnsafeMutablePointer<addrinfo>?
        let gai = getaddrinfo(host, String(port), &hints, &list)
        guard gai == 0, let first = list else {
            let why = gai_strerror(gai).map { String(cString: $0) } ?? "unknown error"
            throw BlockError(.notFound, "address resolution failed for \(endpoint): \(why)", path: endpoint, operation: "connect")
        }
        defer { freeaddrinfo(list) }
        var lastError: Int32 = ECONNREFUSED
        var cur: UnsafeMutablePointer<addrinfo>? = first
        while let ai = cur {
            cur = ai.pointee.ai_next
            let fd = socket(ai.pointee.ai_family, ai.pointee.ai_socktype | Int32(SOCK_CLOEXEC.rawValue), ai.pointee.ai_protocol)
            if fd < 0 { lastError = errno; continue }
            let sock = NBDSocket(fd: fd)
            if retryingEINTR({ Glibc.connect(fd, ai.pointee.ai_addr, ai.pointee.ai_addrlen) }) == 0 {
                var one: Int32 = 1
                _ = setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
                return sock
            }
            lastError = errno
            sock.close()
        }
        throw failure(lastError, endpoint)
    }

    private static func retryingEINTR(_ body: () -> Int32) -> Int32 {
        while true {
            let r = body()
            if r < 0 && errno == EINTR { continue }
            return r
        }
    }

    /// Bounds every blocking receive (for the handshake); 0 removes the bound.
    func setReceiveTimeout(seconds: Int) {
        var tv = timeval(tv_sec: seconds, tv_usec: 0)
        _ = setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }

    /// Reads exactly `count` bytes into `p`.
    /// - Returns: nil on success, else the errno (0 for end of file before `count` bytes).
    func readExactly(_ p: UnsafeMutableRawPointer, _ count: Int) -> Int32? {
        var done = 0
        while done < count {
            let n = recv(fd, p + done, count - done, 0)
            if n > 0 { done += n; continue }
            if n == 0 { return 0 }
            if errno == EINTR { continue }
            return errno
        }
        return nil
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
        var done = 0
        while done < count {
            let n = send(fd, p + done, count - done, Int32(MSG_NOSIGNAL))
            if n > 0 { done += n; continue }
            if n < 0 && errno == EINTR { continue }
            return n == 0 ? EPIPE : errno
        }
        return nil
    }

    func writeAll(_ bytes: [UInt8]) -> Int32? {
        if bytes.isEmpty { return nil }
        // SAFETY: `bytes` is non-empty, so `baseAddress` is non-nil and valid for `count` bytes during
        // the call.
        return bytes.withUnsafeBytes { writeAll($0.baseAddress!, $0.count) }
    }

    /// Wakes every thread blocked on the socket; later calls fail.
    func shutdown() {
        lock.withLock {
            if !closed { _ = Glibc.shutdown(fd, Int32(SHUT_RDWR)) }
        }
    }

    /// Releases the descriptor (once).
    func close() {
        lock.withLock {
            if closed { return }
            closed = true
            _ = Glibc.close(fd)
        }
    }
}

/// A socket failure: an errno, or 0 for the peer closing the connection.
struct NBDSocketError: Error, Sendable {
    var errno: Int32
}
