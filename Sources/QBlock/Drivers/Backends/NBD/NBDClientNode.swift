#if canImport(Glibc)
import Glibc
#endif
import Foundation
import QBlockCore
import QBlockGraph
import QBlockNBDWire

/// The `nbd` protocol driver: a client of an NBD server (`doc/proto.md` of the NBD project),
/// usable wherever a file node is — under a raw or qcow2 format node, or as a backing file.
///
/// One connection carries every request. Requests are pipelined: each gets a cookie, its
/// header (and payload) is written under a send lock on ``IOThreadPool``, and the task waits.
/// A dedicated reader thread reads replies in whatever order the server sends them, matches
/// them to requests by cookie, reads data straight into the waiting request's buffer, and
/// resumes the task. A request completes only when both its reply has arrived and its send
/// has finished, so no thread touches a caller's buffer after the caller has moved on.
///
/// When the connection fails (the server goes away, a protocol violation, a send error), the
/// reader fails every pending request and every later one with a clear error; there is no
/// reconnection.
///
/// Ownership: the node owns the connection. ``close()`` refuses new requests, waits for the
/// ones in flight, flushes, disconnects, and closes the socket only once no thread can use
/// it any more; every call after it throws ``BlockError`` with code `.closed`.
///
/// Requests need not be aligned: the server's minimum block size is honoured by widening
/// reads and by read-modify-write of unaligned writes; requests are split to the server's
/// maximum block size.
///
/// The node is split by concern: connecting, truncate and close here, requests in flight in
/// `NBDClientNode+Requests.swift`, the reader thread in `NBDClientNode+Replies.swift`,
/// reads, writes and flush in `NBDClientNode+ReadWrite.swift`, write-zeroes and discard in
/// `NBDClientNode+Zeroes.swift`, block status in `NBDClientNode+BlockStatus.swift`. The
/// stored state is internal (not private) so that those files reach it; nothing outside
/// this folder uses it.
// @unchecked Sendable: the mutable state (`nextCookie`, `inflight`, `failure`, `closed`) is
// guarded by `lock`, socket writes by `sendLock`; a request's own fields are handed between
// its task, the sending pool thread and the reader thread under `lock` (see `Request`).
public final class NBDClientNode: BlockDriver, @unchecked Sendable {
    /// `nbd`, as QEMU names the protocol driver.
    public let driverName = "nbd"
    /// The export's URI, written as QEMU writes it (``NBDURI/canonicalFilename``).
    public let filename: String
    /// Where the export lives (also the node's file name).
    public let uri: NBDURI
    /// What the handshake negotiated.
    public let info: NBDExportInfo
    /// Whether writes are refused: asked for at open, or the export is read-only.
    public let isReadOnly: Bool
    /// 1: unaligned requests are handled here (read-modify-write against the server's minimum
    /// block size).
    public var requestAlignment: Int { 1 }
    /// Always `nil`: a protocol node has no children.
    public var file: (any BlockDriver)? { nil }
    /// Always `nil`: a protocol node has no children.
    public var backing: (any BlockDriver)? { nil }
    /// The export's size in bytes, from the handshake.
    public var length: Int64 { Int64(info.size) }

    let socket: NBDSocket
    let pool: IOThreadPool
    let lock = PosixMutex()
    let sendLock = PosixMutex()
    /// Orders read-modify-writes of unaligned writes (a server with a minimum block size)
    /// against overlapping writes, zeroing and trims.
    let serializer = RangeSerializer()
    let readerDone = AsyncEvent()
    // Guarded by `lock`:
    var nextCookie: UInt64 = 1
    var inflight: [UInt64: Request] = [:]
    var failure: BlockError?
    var closed = false
    /// Open/closed state and the requests in flight (see ``CloseGate``).
    let gate = CloseGate()

    /// How long the handshake may wait for each server reply.
    static let handshakeTimeoutSeconds = 30

    var minBlock: Int64 { Int64(info.minimumBlockSize) }
    /// Largest read or write payload, a multiple of the minimum block size.
    var maxPayload: Int64 { max(minBlock, Int64(info.maximumBlockSize) / minBlock * minBlock) }
    /// Largest length of a write-zeroes, trim or block-status request.
    var maxNoPayload: Int64 { Int64(1 << 30) / minBlock * minBlock }

    private init(uri: NBDURI, info: NBDExportInfo, socket: NBDSocket, readOnly: Bool, pool: IOThreadPool) {
        self.uri = uri
        self.filename = uri.canonicalFilename
        self.info = info
        self.socket = socket
        self.isReadOnly = readOnly || info.flags.contains(.readOnly)
        self.pool = pool
    }

    /// Connects to the export named by `uri` and negotiates (on a pool thread), as `options`
    /// say: with `openTimeout`, failed attempts are repeated until it has passed; with a
    /// `statusContext`, the server must agree to it.
    /// - Parameters:
    ///   - readOnly: refuse writes even if the export accepts them.
    /// - Throws: ``BlockError``: `.notFound` for an unknown export or a missing socket,
    ///   `.io` for a refused connection or a protocol error, `.unsupported` for TLS,
    ///   `.invalidArgument` when the server does not offer `options.statusContext`.
    public static func connect(_ uri: NBDURI, readOnly: Bool, options: NBDClientOptions = NBDClientOptions(),
                               pool: IOThreadPool = .shared) async throws -> NBDClientNode {
        let (sock, info) = try await establish(uri, options: options, pool: pool)
        if options.statusContext != nil, info.statusContextID == nil {
            // QEMU's nbd_handle_updated_info: its "requested x-dirty-bitmap NAME not found" is
            // dropped on the way (no error pointer), so qemu-img prints the generic open error.
            // The server gets NBD_CMD_DISC as a courtesy.
            await pool.run {
                _ = sock.writeAll(NBDRequest(flags: [], type: NBD.Command.disconnect.rawValue, cookie: 0, offset: 0, length: 0).encode())
                sock.close()
            }
            throw BlockError(.invalidArgument, "Could not open image: Invalid argument", errno: EINVAL, path: uri.text,
                             operation: "nbd open")
        }
        let node = NBDClientNode(uri: uri, info: info, socket: sock, readOnly: readOnly, pool: pool)
        node.startReader()
        return node
    }

    /// One connection attempt: connect and negotiate (blocking, on a pool thread).
    static func attempt(_ uri: NBDURI, options: NBDClientOptions) -> Result<(NBDSocket, NBDExportInfo), BlockError> {
        do {
            let sock = try NBDSocket.connect(uri)
            do {
                sock.setReceiveTimeout(seconds: handshakeTimeoutSeconds)
                let info = try handshake(sock, uri: uri, statusContext: options.statusContext)
                sock.setReceiveTimeout(seconds: 0)
                return .success((sock, info))
            } catch {
                sock.close()
                throw error
            }
        } catch {
            return .failure(error.asBlockError)
        }
    }

    /// Connects and negotiates; with an `openTimeout`, as QEMU's open timer: failed attempts
    /// are repeated after 1, 2, 4, 8, then 16 seconds until the timeout has passed, and the
    /// open then fails with the last attempt's error ("Connection attempt cancelled by
    /// timeout" if the first attempt has not finished by then; its connection is dropped).
    static func establish(_ uri: NBDURI, options: NBDClientOptions, pool: IOThreadPool) async throws -> (NBDSocket, NBDExportInfo) {
        guard options.openTimeout > 0 else {
            return try await pool.run { attempt(uri, options: options) }.get()
        }
        let clock = ContinuousClock()
        let deadline = clock.now + .seconds(Int64(options.openTimeout))
        var lastError: BlockError?
        var pause: Int64 = 1
        while true {
            let race = NBDOpenRace()
            Task.detached {
                let r = await pool.run { attempt(uri, options: options) }
                // Too late: the open has failed; nobody takes this connection.
                if !race.finish(.attempt(r)), case .success((let sock, _)) = r { sock.close() }
            }
            let timer = Task.detached {
                try? await Task.sleep(until: deadline, clock: clock)
                _ = race.finish(.timedOut)
            }
            let outcome = await race.outcome()
            timer.cancel()
            switch outcome {
            case .attempt(.success(let connected)):
                return connected
            case .attempt(.failure(let e)):
                lastError = e
            case .timedOut:
                throw lastError ?? BlockError(.io, "Connection attempt cancelled by timeout", errno: ETIMEDOUT,
                                              path: uri.text, operation: "nbd open")
            }
            let wake = min(clock.now + .seconds(pause), deadline)
            try? await Task.sleep(until: wake, clock: clock)
            if let lastError, clock.now >= deadline { throw lastError }
            pause = min(pause * 2, 16)
        }
    }

    /// Drives ``NBDClientHandshake`` over the socket (blocking).
    static func handshake(_ sock: NBDSocket, uri: NBDURI, statusContext: String? = nil) throws -> NBDExportInfo {
        var hs = NBDClientHandshake(exportName: uri.exportName, statusContext: statusContext)
        var action = hs.start()
        while true {
            switch action {
            case .failed(let e):
                throw e.with(path: uri.text)
            case .done(let send, let info):
                if let e = sock.writeAll(send) { throw lost(e, uri, handshake: true, exportReply: false) }
                return info
            case .exchange(let send, let count):
                if let e = sock.writeAll(send) { throw lost(e, uri, handshake: true, exportReply: false) }
                switch sock.readExactly(count) {
                case .success(let bytes):
                    action = hs.receive(bytes)
                case .failure(let e):
                    throw lost(e.errno, uri, handshake: true, exportReply: hs.isAwaitingExportReply)
                }
            }
        }
    }

    static func lost(_ err: Int32, _ uri: NBDURI, handshake: Bool, exportReply: Bool) -> BlockError {
        if handshake && exportReply && (err == 0 || err == ECONNRESET || err == EPIPE) {
            return BlockError(.notFound, "Requested export not available (the server closed the connection)",
                              errno: ENOENT, path: uri.text, operation: "nbd handshake")
        }
        if handshake && (err == EAGAIN || err == EWOULDBLOCK) {
            return BlockError(.io, "NBD server '\(uri.endpoint)' did not answer the handshake in time",
                              errno: ETIMEDOUT, path: uri.text, operation: "nbd handshake")
        }
        let why = err == 0 ? "the server closed the connection" : BlockError.strerror(err)
        return BlockError(.io, "Connection to NBD server '\(uri.endpoint)' lost\(handshake ? " during the handshake" : ""): \(why)",
                          errno: EIO, path: uri.text, operation: handshake ? "nbd handshake" : "nbd")
    }

    /// NBD exports cannot be resized: succeeds only when `newLength` is the current size.
    /// - Throws: ``BlockError`` `.unsupported` for any other size, or `.closed`.
    public func truncate(to newLength: Int64, preallocation: Preallocation) async throws {
        try gate.check(filename, "truncate")
        if newLength == length { return }
        throw BlockError(.unsupported, newLength > length ? "Cannot grow NBD nodes" : "Cannot resize NBD nodes",
                         path: filename, operation: "truncate")
    }

    /// Refuses new requests and waits for those in flight, flushes (if writable), sends
    /// NBD_CMD_DISCONNECT and releases the connection. A second close returns once the first
    /// has finished.
    public func close() async throws {
        guard await gate.beginClose() else { return }
        defer { gate.finishClose() }
        await gate.drain()
        var flushError: Error?
        if lock.withLock({ failure == nil }) {
            do { try await flushAdmitted() } catch { flushError = error }
        }
        let alreadyFailed: Bool = lock.withLock {
            closed = true
            return failure != nil
        }
        if !alreadyFailed {
            let header = NBDRequest(flags: [], type: NBD.Command.disconnect.rawValue, cookie: 0, offset: 0, length: 0).encode()
            await pool.run { [self] in
                _ = sendLock.withLock { socket.writeAll(header) }
                socket.shutdown()
            }
        } else {
            socket.shutdown()
        }
        await readerDone.wait()
        socket.close()
        if let flushError { throw flushError }
    }
}
