#if canImport(Glibc)
import Glibc
#endif
import Foundation
import QBlockCore
import QBlockNBDWire

/// One client of an ``NBDServer``.
///
/// A dedicated reader thread drives the handshake (``NBDServerHandshake``) and then reads
/// requests, asking ``NBDTransmission`` what each one means; commands run as tasks, many at
/// once, and their replies go out through an ``NBDReplyWriter`` (one more thread) in the
/// order they finish. Blocking socket calls therefore never run on the cooperative pool.
///
/// The connection owns its socket: the reader thread closes it, once, after every request
/// in flight has finished and the writer has stopped.
// @unchecked: `inFlight` and `_export` are only touched with `condition` held; `transmission` is set
// and used by the reader thread only; the lets are immutable or thread-safe (writer, buffer pool).
final class NBDConnection: @unchecked Sendable {
    /// Requests in flight per connection (qemu-nbd's MAX_NBD_REQUESTS).
    static let maxInFlight = 16

    let id: Int
    let fd: Int32
    private weak var server: NBDServer?
    private let exportsSnapshot: [NBDExport]
    private let writer: NBDReplyWriter
    private let condition = NSCondition()
    private var inFlight = 0
    let buffers = NBDBufferPool()
    /// Set by the server (``NBDServer/attach(_:to:)``) under its lock.
    var export: NBDExport? {
        get { condition.withLock { _export } }
        set { condition.withLock { _export = newValue } }
    }
    private var _export: NBDExport?
    /// The name of the export the handshake chose (nil before).
    var exportName: String? { export?.name }
    private(set) var transmission: NBDTransmission?

    init(id: Int, fd: Int32, server: NBDServer, exports: [NBDExport]) {
        self.id = id
        self.fd = fd
        self.server = server
        self.exportsSnapshot = exports
        self.writer = NBDReplyWriter(fd: fd)
    }

    /// Starts the reader thread.
    func start() {
        let t = Thread { [self] in
            self.run()
            self.server?.connectionEnded(self)
        }
        t.name = "qblock-nbd-conn-\(id)"
        t.stackSize = 512 * 1024
        t.start()
    }

    /// Ends the connection from outside: the reader wakes from `recv` and winds down.
    func abort() {
        SocketCalls.shutdown(fd)
    }

    private func run() {
        defer { SocketCalls.close(fd) }
        // The export must still be offered: one deleted during the handshake is not served.
        guard let negotiated = handshake(),
              let export = exportsSnapshot.first(where: { $0.name == negotiated.export.name }),
              server?.attach(self, to: export) ?? false else { return }
        var tx = NBDTransmission(negotiated)
        transmission = tx
        writer.start(name: "qblock-nbd-write-\(id)")
        serve(&tx, export)
        // Let every request in flight finish (their replies may still go out), then stop.
        condition.lock()
        while inFlight > 0 { condition.wait() }
        condition.unlock()
        writer.finish()
    }

    // MARK: - Handshake

    private func handshake() -> NBDNegotiated? {
        var hs = NBDServerHandshake(exports: exportsSnapshot.map(\.info))
        guard sendNow(hs.greeting) else { return nil }
        var buf: [UInt8] = []
        while !hs.isFinished {
            let want = hs.bytesWanted
            buf = [UInt8](repeating: 0, count: want)
            let ok = want == 0 || buf.withUnsafeMutableBytes { p -> Bool in
                if case .success = SocketCalls.recvAll(fd, p.baseAddress!, want) { return true }
                return false
            }
            guard ok else { return nil }
            for action in hs.receive(buf) {
                switch action {
                case .send(let bytes):
                    guard sendNow(bytes) else { return nil }
                case .close:
                    return nil
                case .transmit(let n):
                    return n
                }
            }
        }
        return nil
    }

    private func sendNow(_ bytes: [UInt8]) -> Bool {
        bytes.withUnsafeBytes { p in
            if case .success = SocketCalls.sendAll(fd, [p]) { return true }
            return false
        }
    }

    // MARK: - Transmission

    private func serve(_ tx: inout NBDTransmission, _ export: NBDExport) {
        var header = [UInt8](repeating: 0, count: NBDRequest.size)
        while true {
            condition.lock()
            while inFlight >= Self.maxInFlight { condition.wait() }
            condition.unlock()
            let got = header.withUnsafeMutableBytes { p -> Bool in
                if case .success = SocketCalls.recvAll(fd, p.baseAddress!, NBDRequest.size) { return true }
                return false
            }
            guard got else { return }
            switch tx.receive(header: header) {
            case .close, .disconnect:
                return
            case .reject(let cookie, let error, let message, let discard, let close):
                if discard > 0 && !drain(discard) { return }
                writer.post(tx.errorReply(cookie: cookie, error: error, message: message))
                if close { return }
            case .execute(let command, let cookie, let payload):
                var buffer: NBDBuffer?
                switch command {
                case .read(_, let length, _), .write(_, let length, _):
                    buffer = buffers.take(Int(length))
                default:
                    break
                }
                if payload > 0, let b = buffer {
                    let ok: Bool
                    if case .success = SocketCalls.recvAll(fd, b.base, payload) { ok = true } else { ok = false }
                    guard ok else {
                        // The client went away in the middle of a write's data.
                        buffers.put(b)
                        return
                    }
                }
                condition.lock()
                inFlight += 1
                condition.unlock()
                let transmission = tx
                Task.detached { [self] in
                    await self.execute(command, cookie: cookie, buffer: buffer, tx: transmission, export: export)
                    if let buffer { self.buffers.put(buffer) }
                    self.requestFinished()
                }
            }
        }
    }

    private func requestFinished() {
        condition.lock()
        inFlight -= 1
        condition.signal()
        condition.unlock()
    }

    /// Reads and drops `count` payload bytes.
    private func drain(_ count: Int) -> Bool {
        let b = buffers.take(min(count, 1 << 20))
        defer { buffers.put(b) }
        var left = count
        while left > 0 {
            let n = min(left, b.count)
            guard case .success = SocketCalls.recvAll(fd, b.base, n) else { return false }
            left -= n
        }
        return true
    }

    /// Sends one reply and waits until it is written.
    @discardableResult
    func reply(_ parts: [NBDReplyPart]) async -> Bool {
        await writer.send(parts)
    }
}

/// A buffer for one request's data, recycled through an ``NBDBufferPool``.
// @unchecked: no mutable stored state (`storage` and `base` are immutable); its bytes are used by one
// request at a time, handed over through NBDBufferPool's lock.
final class NBDBuffer: @unchecked Sendable {
    let storage: AlignedBuffer
    /// SAFETY: valid for `count` bytes while `storage` is alive (as long as this object).
    let base: UnsafeMutableRawPointer
    var count: Int { storage.count }

    init(count: Int) {
        storage = AlignedBuffer(count: count)
        base = storage.unsafeBase
    }

    /// The first `length` bytes. SAFETY: only while `self` is alive.
    func bytes(_ length: Int) -> UnsafeMutableRawBufferPointer {
        UnsafeMutableRawBufferPointer(start: base, count: length)
    }
}

/// Recycles request buffers so that the data path does not allocate per request: buffers
/// up to 4 MiB are kept (at most 16 of them); larger ones are freed after use.
// @unchecked: `free` is only touched with `lock` held.
final class NBDBufferPool: @unchecked Sendable {
    private let lock = PosixMutex()
    private var free: [NBDBuffer] = []
    static let keepLimit = 4 << 20
    static let maxKept = 16

    func take(_ count: Int) -> NBDBuffer {
        let found: NBDBuffer? = lock.withLock {
            if let i = free.firstIndex(where: { $0.count >= count }) { return free.remove(at: i) }
            return nil
        }
        if let found { return found }
        // Round small requests up so that a buffer serves neighbouring sizes too.
        let size = count <= Self.keepLimit ? max(4096, (count + 65535) / 65536 * 65536) : count
        return NBDBuffer(count: size)
    }

    func put(_ b: NBDBuffer) {
        guard b.count <= Self.keepLimit else { return }
        lock.withLock {
            if free.count < Self.maxKept { free.append(b) }
        }
    }

    var keptCount: Int { lock.withLock { free.count } }
}
