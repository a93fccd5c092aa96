#if canImport(Glibc)
import Glibc
#endif
import Foundation
import QBlockCore

/// Serves a ``QMPMonitor`` on a Unix-domain socket, to any number of clients at once.
///
/// Blocking socket calls run on dedicated threads (an acceptor; per client a reader and a
/// writer), never on Swift's cooperative pool. Each client's commands run in order, as
/// tasks; at most eight wait per client (QEMU's queue length) before its reader stops
/// reading. Replies and events go through the client's writer queue, so a client that
/// does not read never blocks the monitor (past 64 MiB of unread output it is dropped).
// @unchecked: the listener descriptors, `path`, `connections`, `nextID` and the acceptor/stopping flags
// are only touched with `condition` held; `monitor` is immutable.
public final class QMPServer: @unchecked Sendable {
    /// The monitor served.
    public let monitor: QMPMonitor
    private let condition = NSCondition()
    private var listenFD: Int32 = -1
    private var path: String?
    private var wakeRead: Int32 = -1
    private var wakeWrite: Int32 = -1
    private var connections: [Int: QMPConnection] = [:]
    private var nextID = 0
    private var acceptorRunning = false
    private var stopping = false

    /// A server for `monitor`; call ``listen(unix:)`` to start it.
    public init(monitor: QMPMonitor) { self.monitor = monitor }

    deinit {
        if wakeRead >= 0 { SocketCalls.close(wakeRead) }
        if wakeWrite >= 0 { SocketCalls.close(wakeWrite) }
    }

    /// Listens on the Unix socket `path` (a stale socket file is replaced) and starts accepting.
    /// - Throws: ``BlockError`` from `socket`/`bind`/`listen`.
    public func listen(unix path: String) throws {
        let fd: Int32
        switch SocketCalls.listenUnix(path: path, backlog: 16) {
        case .success(let f): fd = f
        case .failure(let e):
            throw BlockError.system(e.rawValue, "listen", path: path)
                .withMessage("Failed to bind socket to \(path): \(BlockError.strerror(e.rawValue))")
        }
        guard case .success(let (r, w)) = SocketCalls.pipe() else {
            SocketCalls.close(fd)
            throw BlockError(.io, "Cannot create a pipe", operation: "listen")
        }
        condition.withLock {
            listenFD = fd
            self.path = path
            wakeRead = r
            wakeWrite = w
            acceptorRunning = true
        }
        let t = Thread { [self] in
            acceptLoop()
            condition.withLock {
                acceptorRunning = false
                condition.broadcast()
            }
        }
        t.name = "qblock-qmp-accept"
        t.stackSize = 256 * 1024
        t.start()
    }

    /// Clients connected now.
    public var clientCount: Int { condition.withLock { connections.count } }

    /// Stops accepting, sends what is queued to each client, disconnects them and removes
    /// the socket file. Idempotent.
    public func shutdown() async {
        let conns: [QMPConnection] = condition.withLock {
            stopping = true
            return Array(connections.values)
        }
        if wakeWrite >= 0 { _ = withUnsafeBytes(of: UInt8(1)) { Glibc.write(wakeWrite, $0.baseAddress, 1) } }
        for c in conns { c.close() }
        await IOThreadPool.shared.run { [self] in
            condition.lock()
            while acceptorRunning || !connections.isEmpty { condition.wait() }
            condition.unlock()
        }
        let (fd, p): (Int32, String?) = condition.withLock {
            let r = (listenFD, path)
            listenFD = -1
            path = nil
            return r
        }
        if fd >= 0 { SocketCalls.close(fd) }
        if let p { unlink(p) }
    }

    private func acceptLoop() {
        let (fd, wake) = condition.withLock { (listenFD, wakeRead) }
        while true {
            switch SocketCalls.waitReadable(fd, wakeFD: wake) {
            case .success(true): break
            case .success(false), .failure: return
            }
            let c: Int32
            switch SocketCalls.accept(fd) {
            case .success(let s): c = s
            case .failure(let e) where e.rawValue == EMFILE || e.rawValue == ENFILE || e.rawValue == ENOBUFS || e.rawValue == ENOMEM:
                usleep(10_000)
                continue
            case .failure:
                return
            }
            let conn: QMPConnection? = condition.withLock {
                guard !stopping else { return nil }
                nextID += 1
                let conn = QMPConnection(id: nextID, fd: c, monitor: monitor) { [weak self] conn in self?.ended(conn) }
                connections[nextID] = conn
                return conn
            }
            guard let conn else {
                SocketCalls.close(c)
                return
            }
            conn.start()
        }
    }

    private func ended(_ c: QMPConnection) {
        condition.withLock {
            connections[c.id] = nil
            condition.broadcast()
        }
    }
}

/// One QMP client: a reader thread feeding the JSON streamer, a task running its commands
/// in order, and a writer thread sending replies and events.
// @unchecked: `outQueue`, `outBytes`, `closing` and `threadsLeft` are only touched with `condition`
// held; `slots` is a semaphore; the lets are immutable.
final class QMPConnection: @unchecked Sendable {
    /// Requests queued per client before the reader stops reading (QEMU's QMP_REQ_QUEUE_LEN_MAX).
    static let maxQueued = 8
    /// Unread output past which a client is dropped.
    static let maxOutput = 64 << 20

    let id: Int
    let fd: Int32
    private let monitor: QMPMonitor
    private let onEnd: @Sendable (QMPConnection) -> Void
    private let condition = NSCondition()
    private var outQueue: [[UInt8]] = []
    private var outBytes = 0
    private var closing = false
    private var threadsLeft = 2
    private let slots = DispatchSemaphore(value: QMPConnection.maxQueued)

    init(id: Int, fd: Int32, monitor: QMPMonitor, onEnd: @escaping @Sendable (QMPConnection) -> Void) {
        self.id = id
        self.fd = fd
        self.monitor = monitor
        self.onEnd = onEnd
    }

    func start() {
        let session = monitor.openSession { [weak self] message in self?.send(message) }
        send(monitor.greeting)
        let (stream, continuation) = AsyncStream<QMPStreamer.Output>.makeStream()
        let reader = Thread { [self] in
            readLoop(continuation)
            threadEnded()
        }
        reader.name = "qblock-qmp-read-\(id)"
        // The parser recurses once per nesting level (at most 1024): room for that in debug builds.
        reader.stackSize = 8 << 20
        let writer = Thread { [self] in
            writeLoop()
            threadEnded()
        }
        writer.name = "qblock-qmp-write-\(id)"
        writer.stackSize = 256 * 1024
        reader.start()
        writer.start()
        let monitor = self.monitor
        Task { [self] in
            for await input in stream {
                let reply = await monitor.handle(input, session: session)
                session.send(reply)
                slots.signal()
                if session.quitAfterReply {
                    session.quitAfterReply = false
                    monitor.requestQuit()
                }
            }
            monitor.closeSession(session)
            close()
        }
    }

    /// Queues one message (a reply or an event) as a line.
    func send(_ message: QObject) {
        let line = Array((message.compactJSON + "\r\n").utf8)
        let drop: Bool = condition.withLock {
            if closing { return false }
            outQueue.append(line)
            outBytes += line.count
            condition.broadcast()
            return outBytes > QMPConnection.maxOutput
        }
        if drop { SocketCalls.shutdown(fd) }
    }

    /// Sends what is queued, then disconnects.
    func close() {
        condition.withLock {
            closing = true
            condition.broadcast()
        }
    }

    private func readLoop(_ continuation: AsyncStream<QMPStreamer.Output>.Continuation) {
        var streamer = QMPStreamer()
        let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: 65536, alignment: 8)
        defer {
            buf.deallocate()
            continuation.finish()
        }
        while true {
            let n = recv(fd, buf.baseAddress, buf.count, 0)
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return }
            for out in streamer.feed(UnsafeRawBufferPointer(rebasing: buf[0..<n])) {
                // Wait for a free slot; give up when the connection is closing (a command
                // ahead may never finish).
                while slots.wait(timeout: .now() + .milliseconds(100)) == .timedOut {
                    if condition.withLock({ closing }) { return }
                }
                continuation.yield(out)
            }
        }
    }

    private func writeLoop() {
        while true {
            condition.lock()
            while outQueue.isEmpty && !closing { condition.wait() }
            let batch = outQueue
            outQueue = []
            outBytes = 0
            let done = closing && batch.isEmpty
            condition.unlock()
            if done { break }
            let bytes = batch.count == 1 ? batch[0] : Array(batch.joined())
            let ok = bytes.withUnsafeBytes { p -> Bool in
                if case .failure = SocketCalls.sendAll(fd, [p]) { return false }
                return true
            }
            if !ok {
                condition.withLock { closing = true; outQueue = [] }
                break
            }
        }
        SocketCalls.shutdown(fd)
    }

    private func threadEnded() {
        let last: Bool = condition.withLock {
            threadsLeft -= 1
            return threadsLeft == 0
        }
        if last {
            SocketCalls.close(fd)
            onEnd(self)
        }
    }
}
