#if canImport(Glibc)
import Glibc
#endif
import Synchronization

/// The socket-call seam of the NBD server and the NBD client (and the QMP server): every
/// socket system call they make goes through here, retrying `EINTR` in this one place and
/// returning `Result<_, Errno>` (as ``Syscalls`` does for files). Every call here blocks, so
/// callers run them on dedicated threads or on ``IOThreadPool``, never on Swift's
/// cooperative pool.
///
/// Tests make chosen calls fail with ``withInjector(path:_:_:)``: scoped to its body, and
/// keyed by a Unix socket path, so that it applies to the socket a server listens on there,
/// the connections that server accepts, and the connections a client makes to that path,
/// and to nothing another test does.
public enum SocketCalls {
    /// An `errno` value from a failed socket call (the same type as ``Syscalls/Errno``).
    public typealias Errno = Syscalls.Errno

    /// The calls a fault injector may intercept.
    public enum Call: Sendable {
        /// A server accepting a connection.
        case accept
        /// Receiving bytes (server or client side).
        case recv
        /// Sending bytes (server or client side).
        case send
        /// A client connecting to the hooked path (before `connect(2)`).
        case connect
    }

    /// Runs `body` with `injector` consulted before every `accept`, `recv`, `send` and
    /// `connect` on the Unix socket listening at `path` (listened on while the hook is
    /// installed), on the connections accepted from it, and on client connections made to
    /// `path` while it is installed: given the call and descriptor, it returns an errno to
    /// fail the call with, or nil. Removed when `body` ends, even by throwing.
    public static func withInjector<R>(path: String, _ injector: @escaping @Sendable (Call, Int32) -> Int32?,
                                       _ body: () async throws -> R) async rethrows -> R {
        let id = hooks.install(path: path, injector)
        defer { hooks.remove(id) }
        return try await body()
    }

    private static let hooks = SocketHookRegistry()

    @inline(__always)
    static func injected(_ call: Call, _ fd: Int32) -> Errno? {
        guard let inj = hooks.injector(for: fd), let e = inj(call, fd) else { return nil }
        return Errno(e)
    }

    /// A listening Unix-domain socket bound to `path` (an existing socket file there is
    /// replaced, as qemu-nbd does).
    package static func listenUnix(path: String, backlog: Int32) -> Result<Int32, Errno> {
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        let capacity = MemoryLayout.size(ofValue: addr.sun_path)
        guard !bytes.isEmpty, bytes.count < capacity else { return .failure(Errno(ENAMETOOLONG)) }
        // SAFETY: `bytes.count < capacity` was checked above, so the path and its NUL fit in
        // `sun_path`.
        withUnsafeMutableBytes(of: &addr.sun_path) { p in
            p.copyBytes(from: bytes)
            p[bytes.count] = 0
        }
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        if fd < 0 { return .failure(Errno(errno)) }
        unlink(path)
        hooks.attach(fd, path: path)
        let r = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        if r != 0 || Glibc.listen(fd, backlog) != 0 {
            let e = errno
            close(fd)
            return .failure(Errno(e))
        }
        return .success(fd)
    }

    /// A listening TCP socket on `host` (a numeric IPv4 or IPv6 address, or a name resolved
    /// with getaddrinfo) and `port` (0: any free port). Returns the socket and the bound port.
    package static func listenTCP(host: String, port: UInt16, backlog: Int32) -> Result<(Int32, UInt16), Errno> {
        var hints = addrinfo()
        hints.ai_family = AF_UNSPEC
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        hints.ai_flags = AI_PASSIVE
        var res: UnsafeMutablePointer<addrinfo>?
        let gai = getaddrinfo(host.isEmpty ? nil : host, String(port), &hints, &res)
        guard gai == 0, let first = res else { return .failure(Errno(gai == EAI_SYSTEM ? errno : EADDRNOTAVAIL)) }
        defer { freeaddrinfo(res) }
        var lastError = EADDRNOTAVAIL
        var cur: UnsafeMutablePointer<addrinfo>? = first
        while let ai = cur {
            cur = ai.pointee.ai_next
            let fd = socket(ai.pointee.ai_family, ai.pointee.ai_socktype | Int32(SOCK_CLOEXEC.rawValue), ai.pointee.ai_protocol)
            if fd < 0 { lastError = errno; continue }
            var one: Int32 = 1
            setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
            if bind(fd, ai.pointee.ai_addr, ai.pointee.ai_addrlen) != 0 || Glibc.listen(fd, backlog) != 0 {
                lastError = errno
                Glibc.close(fd)
                continue
            }
            var storage = sockaddr_storage()
            var len = socklen_t(MemoryLayout<sockaddr_storage>.size)
            var bound = port
            let ok = withUnsafeMutablePointer(to: &storage) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) }
            }
            if ok == 0 {
                bound = withUnsafePointer(to: &storage) { p -> UInt16 in
                    if Int32(p.pointee.ss_family) == AF_INET6 {
                        return p.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { UInt16(bigEndian: $0.pointee.sin6_port) }
                    }
                    return p.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { UInt16(bigEndian: $0.pointee.sin_port) }
                }
            }
            return .success((fd, bound))
        }
        return .failure(Errno(lastError))
    }

    /// Waits until `fd` is readable or `wakeFD` is (then returns false).
    package static func waitReadable(_ fd: Int32, wakeFD: Int32) -> Result<Bool, Errno> {
        var fds = [pollfd(fd: fd, events: Int16(POLLIN), revents: 0), pollfd(fd: wakeFD, events: Int16(POLLIN), revents: 0)]
        while true {
            let r = poll(&fds, 2, -1)
            if r < 0 {
                if errno == EINTR { continue }
                return .failure(Errno(errno))
            }
            if fds[1].revents != 0 { return .success(false) }
            if fds[0].revents != 0 { return .success(true) }
        }
    }

    /// Why a client could not connect: a system call's errno, or a host name that did not
    /// resolve (`getaddrinfo`'s message).
    package enum ConnectError: Error, Sendable {
        /// `socket` or `connect` failed with this errno (`ENAMETOOLONG`: the Unix socket path
        /// does not fit in `sun_path`).
        case system(Errno)
        /// Name resolution failed, with `gai_strerror`'s text.
        case resolution(String)
    }

    /// A stream socket connected to the Unix socket at `path` (close-on-exec). While a hook
    /// is installed for `path`, the new connection is hooked too: the hook is asked about
    /// `.connect` before `connect(2)`, and about every `recv` and `send` afterwards.
    package static func connectUnix(path: String) -> Result<Int32, ConnectError> {
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        let capacity = MemoryLayout.size(ofValue: addr.sun_path)
        guard bytes.count < capacity else { return .failure(.system(Errno(ENAMETOOLONG))) }
        // SAFETY: `bytes.count < capacity` was checked above, so the path and its NUL fit in
        // `sun_path`.
        withUnsafeMutableBytes(of: &addr.sun_path) { p in
            p.copyBytes(from: bytes)
            p[bytes.count] = 0
        }
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        if fd < 0 { return .failure(.system(Errno(errno))) }
        hooks.attach(fd, path: path)
        if let e = injected(.connect, fd) {
            close(fd)
            return .failure(.system(e))
        }
        let r: Int32 = withUnsafePointer(to: &addr) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { sa in
                retryingEINTR { Glibc.connect(fd, sa, socklen_t(MemoryLayout<sockaddr_un>.size)) }
            }
        }
        if r != 0 {
            let e = errno
            close(fd)
            return .failure(.system(Errno(e)))
        }
        return .success(fd)
    }

    /// A TCP connection to `host` (a name or a numeric address) and `port`, trying each
    /// address `getaddrinfo` gives in turn, with `TCP_NODELAY` set (close-on-exec).
    /// - Returns: the socket, or the last address's errno (`ECONNREFUSED` when none could
    ///   be tried), or the resolution failure.
    package static func connectTCP(host: String, port: UInt16) -> Result<Int32, ConnectError> {
        var hints = addrinfo()
        hints.ai_family = AF_UNSPEC
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        var list: UnsafeMutablePointer<addrinfo>?
        let gai = getaddrinfo(host, String(port), &hints, &list)
        guard gai == 0, let first = list else {
            return .failure(.resolution(gai_strerror(gai).map { String(cString: $0) } ?? "unknown error"))
        }
        defer { freeaddrinfo(list) }
        var lastError: Int32 = ECONNREFUSED
        var cur: UnsafeMutablePointer<addrinfo>? = first
        while let ai = cur {
            cur = ai.pointee.ai_next
            let fd = socket(ai.pointee.ai_family, ai.pointee.ai_socktype | Int32(SOCK_CLOEXEC.rawValue), ai.pointee.ai_protocol)
            if fd < 0 { lastError = errno; continue }
            if retryingEINTR({ Glibc.connect(fd, ai.pointee.ai_addr, ai.pointee.ai_addrlen) }) == 0 {
                var one: Int32 = 1
                _ = setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
                return .success(fd)
            }
            lastError = errno
            close(fd)
        }
        return .failure(.system(Errno(lastError)))
    }

    private static func retryingEINTR(_ body: () -> Int32) -> Int32 {
        while true {
            let r = body()
            if r < 0 && errno == EINTR { continue }
            return r
        }
    }

    /// Bounds every blocking receive on `fd` to `seconds` (`SO_RCVTIMEO`; a receive that
    /// times out fails with `EAGAIN`); 0 removes the bound.
    package static func setReceiveTimeout(_ fd: Int32, seconds: Int) {
        var tv = timeval(tv_sec: seconds, tv_usec: 0)
        _ = setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }

    /// Accepts one connection (close-on-exec).
    package static func accept(_ fd: Int32) -> Result<Int32, Errno> {
        if let e = injected(.accept, fd) { return .failure(e) }
        while true {
            let c = Glibc.accept(fd, nil, nil)
            if c >= 0 {
                hooks.accepted(c, from: fd)
                _ = fcntl(c, F_SETFD, FD_CLOEXEC)
                var one: Int32 = 1
                // TCP_NODELAY: replies are written whole, so Nagle only adds latency. (Fails
                // harmlessly on Unix sockets.)
                setsockopt(c, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
                return .success(c)
            }
            if errno == EINTR || errno == ECONNABORTED { continue }
            return .failure(Errno(errno))
        }
    }

    /// Receives exactly `count` bytes; fails with `ECONNRESET` on end of stream.
    package static func recvAll(_ fd: Int32, _ buf: UnsafeMutableRawPointer, _ count: Int) -> Result<Void, Errno> {
        receive(fd, buf, count, flags: Int32(MSG_WAITALL)).flatMap { $0 ? .success(()) : .failure(Errno(ECONNRESET)) }
    }

    /// Receives exactly `count` bytes, telling end of stream apart from an error (the NBD
    /// client words them differently).
    /// - Returns: true when all `count` bytes arrived, false when the peer closed the
    ///   connection first, or the errno of a failed receive (`EAGAIN` after the receive
    ///   timeout).
    package static func recvExactly(_ fd: Int32, _ buf: UnsafeMutableRawPointer, _ count: Int) -> Result<Bool, Errno> {
        receive(fd, buf, count, flags: 0)
    }

    private static func receive(_ fd: Int32, _ buf: UnsafeMutableRawPointer, _ count: Int, flags: Int32) -> Result<Bool, Errno> {
        if let e = injected(.recv, fd) { return .failure(e) }
        var done = 0
        while done < count {
            let r = recv(fd, buf + done, count - done, flags)
            if r < 0 {
                if errno == EINTR { continue }
                return .failure(Errno(errno))
            }
            if r == 0 { return .success(false) }
            done += r
        }
        return .success(true)
    }

    /// Sends every byte of the buffers, in order, with one `sendmsg` where the kernel takes
    /// them all; never raises SIGPIPE.
    package static func sendAll(_ fd: Int32, _ parts: [UnsafeRawBufferPointer]) -> Result<Void, Errno> {
        if let e = injected(.send, fd) { return .failure(e) }
        var iov = parts.filter { $0.count > 0 }.map { iovec(iov_base: UnsafeMutableRawPointer(mutating: $0.baseAddress), iov_len: $0.count) }
        var first = 0
        while first < iov.count {
            let n = min(iov.count - first, 512)
            // SAFETY: `first + n <= iov.count`, so the iovec slice is inside the array, which outlives
            // the sendmsg call; each iovec points into a caller buffer alive for this call.
            let r = iov.withUnsafeMutableBufferPointer { p -> Int in
                var msg = msghdr()
                msg.msg_iov = p.baseAddress! + first
                msg.msg_iovlen = n
                return sendmsg(fd, &msg, Int32(MSG_NOSIGNAL))
            }
            if r < 0 {
                if errno == EINTR { continue }
                return .failure(Errno(errno))
            }
            var sent = r
            while sent > 0 && first < iov.count {
                if sent >= iov[first].iov_len {
                    sent -= iov[first].iov_len
                    first += 1
                } else {
                    iov[first].iov_base = iov[first].iov_base! + sent
                    iov[first].iov_len -= sent
                    sent = 0
                }
            }
        }
        return .success(())
    }

    /// Shuts a socket down both ways: wakes a thread blocked in `recv` on it.
    package static func shutdown(_ fd: Int32) { _ = Glibc.shutdown(fd, Int32(SHUT_RDWR)) }

    /// Closes `fd`, forgetting any hook on it first.
    package static func close(_ fd: Int32) {
        // Forget the descriptor first: once closed, its number may go to another socket.
        hooks.closing(fd)
        _ = Glibc.close(fd)
    }

    /// A pipe used to wake a thread blocked in `poll` (close-on-exec).
    package static func pipe() -> Result<(Int32, Int32), Errno> {
        var fds: [Int32] = [0, 0]
        if Glibc.pipe(&fds) != 0 { return .failure(Errno(errno)) }
        for f in fds { _ = fcntl(f, F_SETFD, FD_CLOEXEC) }
        return .success((fds[0], fds[1]))
    }
}

/// The socket hooks tests installed with ``SocketCalls/withInjector(path:_:_:)``, and the
/// descriptors each applies to: the socket listening at its path, the connections accepted
/// from it, and client connections made to its path, until they are closed through
/// ``SocketCalls/close(_:)``.
// @unchecked: `nextID`, `scopes` and `byFD` are only touched with `lock` held; `matched` is an Atomic.
private final class SocketHookRegistry: @unchecked Sendable {
    // @unchecked: every var is read and written only with `lock` held; `matched` is atomic.
    typealias Hook = @Sendable (SocketCalls.Call, Int32) -> Int32?
    private struct Scope { let id: UInt64; let path: String; let hook: Hook }

    private let lock = PosixMutex()
    private var nextID: UInt64 = 1
    private var scopes: [Scope] = []
    private var byFD: [Int32: Scope] = [:]
    /// `byFD.count`, read without the lock so that calls without hooks pay one atomic load.
    private let matched = Atomic<Int>(0)

    func install(path: String, _ hook: @escaping Hook) -> UInt64 {
        lock.withLock {
            let s = Scope(id: nextID, path: path, hook: hook)
            nextID += 1
            scopes.append(s)
            return s.id
        }
    }

    func remove(_ id: UInt64) {
        lock.withLock {
            scopes.removeAll { $0.id == id }
            byFD = byFD.filter { $0.value.id != id }
            matched.store(byFD.count, ordering: .releasing)
        }
    }

    @inline(__always)
    func injector(for fd: Int32) -> Hook? {
        if matched.load(ordering: .acquiring) == 0 { return nil }
        return lock.withLock { byFD[fd]?.hook }
    }

    /// A socket about to listen at `path` or to connect to it: hooked by the newest scope
    /// for `path`, if any.
    func attach(_ fd: Int32, path: String) {
        lock.withLock {
            guard let s = scopes.last(where: { $0.path == path }) else { return }
            byFD[fd] = s
            matched.store(byFD.count, ordering: .releasing)
        }
    }

    func accepted(_ fd: Int32, from listener: Int32) {
        if matched.load(ordering: .acquiring) == 0 { return }
        lock.withLock {
            guard let s = byFD[listener] else { return }
            byFD[fd] = s
            matched.store(byFD.count, ordering: .releasing)
        }
    }

    func closing(_ fd: Int32) {
        if matched.load(ordering: .acquiring) == 0 { return }
        lock.withLock {
            if byFD.removeValue(forKey: fd) != nil { matched.store(byFD.count, ordering: .releasing) }
        }
    }
}
