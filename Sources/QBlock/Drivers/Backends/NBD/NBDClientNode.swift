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

    private let socket: NBDSocket
    private let pool: IOThreadPool
    private let lock = PosixMutex()
    private let sendLock = PosixMutex()
    private let rmwLock = AsyncMutex()
    private let readerDone = AsyncEvent()
    // Guarded by `lock`:
    private var nextCookie: UInt64 = 1
    private var inflight: [UInt64: Request] = [:]
    private var failure: BlockError?
    private var closed = false
    /// Open/closed state and the requests in flight (see ``CloseGate``).
    private let gate = CloseGate()

    /// How long the handshake may wait for each server reply.
    static let handshakeTimeoutSeconds = 30

    private var minBlock: Int64 { Int64(info.minimumBlockSize) }
    /// Largest read or write payload, a multiple of the minimum block size.
    private var maxPayload: Int64 { max(minBlock, Int64(info.maximumBlockSize) / minBlock * minBlock) }
    /// Largest length of a write-zeroes, trim or block-status request.
    private var maxNoPayload: Int64 { Int64(1 << 30) / minBlock * minBlock }

    private init(uri: NBDURI, info: NBDExportInfo, socket: NBDSocket, readOnly: Bool, pool: IOThreadPool) {
        self.uri = uri
        self.filename = uri.canonicalFilename
        self.info = info
        self.socket = socket
        self.isReadOnly = readOnly || info.flags.contains(.readOnly)
        self.pool = pool
    }

    /// Connects to the export named by `uri` and negotiates (on a pool thread).
    /// - Parameters:
    ///   - readOnly: refuse writes even if the export accepts them.
    /// - Throws: ``BlockError``: `.notFound` for an unknown export or a missing socket,
    ///   `.io` for a refused connection or a protocol error, `.unsupported` for TLS.
    public static func connect(_ uri: NBDURI, readOnly: Bool, pool: IOThreadPool = .shared) async throws -> NBDClientNode {
        let r: Result<(NBDSocket, NBDExportInfo), BlockError> = await pool.run {
            do {
                let sock = try NBDSocket.connect(uri)
                do {
                    sock.setReceiveTimeout(seconds: handshakeTimeoutSeconds)
                    let info = try handshake(sock, uri: uri)
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
        let (sock, info) = try r.get()
        let node = NBDClientNode(uri: uri, info: info, socket: sock, readOnly: readOnly, pool: pool)
        node.startReader()
        return node
    }

    /// Drives ``NBDClientHandshake`` over the socket (blocking).
    private static func handshake(_ sock: NBDSocket, uri: NBDURI) throws -> NBDExportInfo {
        var hs = NBDClientHandshake(exportName: uri.exportName)
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

    private static func lost(_ err: Int32, _ uri: NBDURI, handshake: Bool, exportReply: Bool) -> BlockError {
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

    // MARK: Requests in flight

    /// A request waiting for its reply.
    // @unchecked Sendable: `error` and `extents` are written by the reader thread before it
    // completes the request and read by the task only after; `sent`, `replied` and
    // `continuation` are only touched with the node's `lock` held.
    private final class Request: @unchecked Sendable {
        let command: NBD.Command
        let offset: UInt64
        let length: UInt32
        /// Where read data goes (reads only). SAFETY: valid until the request completes,
        /// because the task that owns it is suspended until then.
        let buffer: UnsafeMutableRawPointer?
        var error: BlockError?
        /// First extent of each metadata context (block status only).
        var extents: [UInt32: (length: UInt32, flags: UInt32)] = [:]
        var sent = false
        var replied = false
        var continuation: UnsafeContinuation<Void, Never>?

        init(command: NBD.Command, offset: UInt64, length: UInt32, buffer: UnsafeMutableRawPointer?) {
            self.command = command
            self.offset = offset
            self.length = length
            self.buffer = buffer
        }
    }

    private func closedError(_ op: String) -> BlockError {
        CloseGate.closedError(filename, op)
    }

    /// Sends one request and waits for its reply.
    /// - Returns: the request, with its error or extents.
    @discardableResult
    private func perform(_ command: NBD.Command, flags: NBD.CommandFlags = [], offset: Int64, length: Int,
                         payload: UnsafeRawPointer? = nil, into buffer: UnsafeMutableRawPointer? = nil,
                         operation: String) async throws -> Request {
        let req = Request(command: command, offset: UInt64(offset), length: UInt32(length), buffer: buffer)
        let payloadPtr = payload.map { SendablePointer(raw: UnsafeMutableRawPointer(mutating: $0)) }
        let payloadCount = payload == nil ? 0 : length
        await withUnsafeContinuation { (cont: UnsafeContinuation<Void, Never>) in
            let cookie: UInt64? = lock.withLock {
                if let f = failure {
                    req.error = f
                    return nil
                }
                if closed {
                    req.error = closedError(operation)
                    return nil
                }
                let c = nextCookie
                nextCookie &+= 1
                req.continuation = cont
                inflight[c] = req
                return c
            }
            guard let cookie else {
                cont.resume()
                return
            }
            let header = NBDRequest(flags: flags, type: command.rawValue, cookie: cookie, offset: UInt64(offset),
                                    length: UInt32(length)).encode()
            pool.submit { [self] in
                let err: Int32? = sendLock.withLock {
                    if let e = socket.writeAll(header) { return e }
                    if let p = payloadPtr, payloadCount > 0 { return socket.writeAll(p.raw, payloadCount) }
                    return nil
                }
                if let err { connectionFailed(NBDClientNode.lost(err, uri, handshake: false, exportReply: false)) }
                let resume: UnsafeContinuation<Void, Never>? = lock.withLock {
                    req.sent = true
                    if req.replied { defer { req.continuation = nil }; return req.continuation }
                    return nil
                }
                resume?.resume()
            }
        }
        if let e = req.error { throw e.with(path: filename, offset: offset, operation: operation) }
        return req
    }

    /// Records that the connection is unusable and wakes the reader, which fails every
    /// pending request.
    private func connectionFailed(_ error: BlockError) {
        lock.withLock { if failure == nil { failure = error } }
        socket.shutdown()
    }

    /// Marks `req` as answered (with whatever error it collected) and resumes its task
    /// if its send has finished too.
    private func complete(_ cookie: UInt64, _ req: Request) {
        let resume: UnsafeContinuation<Void, Never>? = lock.withLock {
            inflight[cookie] = nil
            req.replied = true
            if req.sent { defer { req.continuation = nil }; return req.continuation }
            return nil
        }
        resume?.resume()
    }

    // MARK: The reader thread

    private func startReader() {
        let t = Thread { [self] in
            readerLoop()
        }
        t.name = "qblock-nbd-reader"
        t.stackSize = 256 * 1024
        t.start()
    }

    private func protocolViolation(_ reason: String) -> BlockError {
        BlockError(.io, "NBD protocol error: \(reason)", errno: EPROTO, path: filename, operation: "nbd")
    }

    /// Reads replies until the connection ends, then fails whatever is still pending.
    private func readerLoop() {
        var ending: BlockError
        while true {
            do {
                try readOneReply()
            } catch let e as NBDSocketError {
                ending = NBDClientNode.lost(e.errno, uri, handshake: false, exportReply: false)
                break
            } catch {
                ending = error.asBlockError
                break
            }
        }
        let pending: [(UInt64, Request)] = lock.withLock {
            if failure == nil { failure = closed ? closedError("nbd") : ending }
            let f = failure ?? ending
            let all = Array(inflight)
            for (_, r) in all where r.error == nil { r.error = f }
            return all
        }
        socket.shutdown()
        for (cookie, r) in pending { complete(cookie, r) }
        readerDone.signal()
    }

    private func read(_ count: Int) throws -> [UInt8] {
        try socket.readExactly(count).get()
    }

    private func readInto(_ p: UnsafeMutableRawPointer, _ count: Int) throws {
        if count == 0 { return }
        if let e = socket.readExactly(p, count) { throw NBDSocketError(errno: e) }
    }

    /// The error a server reported for a request.
    private func serverError(_ wire: UInt32, message: String, req: Request) -> BlockError {
        // Values are the protocol's errno subset (Linux numbering); anything else is EINVAL.
        let known: Set<UInt32> = [1, 5, 12, 22, 28, 75, 95, 108]
        let err = known.contains(wire) ? Int32(wire) : EINVAL
        var e = BlockError.system(err, operationName(req.command), path: filename, offset: Int64(req.offset))
        if !message.isEmpty {
            e.underlying = BlockError(e.code, "server reported: \(message)", errno: err, path: filename)
        }
        return e
    }

    private func operationName(_ c: NBD.Command) -> String {
        switch c {
        case .read: return "read"
        case .write: return "write"
        case .flush: return "flush"
        case .trim: return "discard"
        case .writeZeroes: return "write zeroes"
        case .blockStatus: return "block status"
        default: return "nbd"
        }
    }

    private func readOneReply() throws {
        var head = try read(NBDReplyHeader.simpleSize)
        do {
            if try NBDReplyHeader.totalSize(first16: head) == NBDReplyHeader.chunkSize {
                head += try read(NBDReplyHeader.chunkSize - NBDReplyHeader.simpleSize)
            }
        } catch let v as NBDProtocolViolation { throw protocolViolation(v.reason) }
        let header: NBDReplyHeader
        do { header = try NBDReplyHeader.decode(head) } catch { throw protocolViolation(error.reason) }
        let cookie = header.cookie
        guard let req = lock.withLock({ inflight[cookie] }) else {
            throw protocolViolation("reply with unknown cookie \(cookie)")
        }
        switch header {
        case .simple(let error, _):
            if error != 0 {
                req.error = serverError(error, message: "", req: req)
            } else if req.command == .read, let buf = req.buffer {
                if info.structuredReplies { throw protocolViolation("simple reply to a read after structured replies were negotiated") }
                try readInto(buf, Int(req.length))
            }
            complete(cookie, req)

        case .chunk(let flags, let type, _, let length):
            try readChunk(req, type: type, length: length)
            if flags & NBD.replyFlagDone != 0 { complete(cookie, req) }
        }
    }

    private func readChunk(_ req: Request, type: UInt16, length: UInt32) throws {
        guard info.structuredReplies else { throw protocolViolation("structured reply without negotiation") }
        switch NBD.ReplyType(rawValue: type) {
        case NBD.ReplyType.none?:
            guard length == 0 else { throw protocolViolation("NBD_REPLY_TYPE_NONE with a payload") }
        case .offsetData:
            guard req.command == .read, let buf = req.buffer, length > 8 else {
                throw protocolViolation("unexpected data chunk")
            }
            var r = NBDReader(try read(8))
            let off = try r.u64()
            let pos: Int
            do { pos = try NBDChunk.position(offset: off, count: UInt64(length - 8), reqOffset: req.offset, reqLength: req.length) }
            catch { throw protocolViolation(error.reason) }
            try readInto(buf + pos, Int(length - 8))
        case .offsetHole:
            guard req.command == .read, let buf = req.buffer, length == 12 else {
                throw protocolViolation("unexpected hole chunk")
            }
            do {
                let (off, n) = try NBDChunk.decodeHole(try read(12))
                let pos = try NBDChunk.position(offset: off, count: UInt64(n), reqOffset: req.offset, reqLength: req.length)
                memset(buf + pos, 0, Int(n))
            } catch let v as NBDProtocolViolation { throw protocolViolation(v.reason) }
        case .blockStatus:
            guard req.command == .blockStatus, length <= 1 << 20 else { throw protocolViolation("unexpected block status chunk") }
            do {
                let (id, extents) = try NBDChunk.decodeBlockStatus(try read(Int(length)))
                guard let first = extents.first else { throw NBDProtocolViolation("empty block status chunk") }
                guard first.length > 0 else { throw NBDProtocolViolation("block status extent of length 0") }
                if req.extents[id] == nil { req.extents[id] = first }
            } catch let v as NBDProtocolViolation { throw protocolViolation(v.reason) }
        default:
            guard NBDChunk.isErrorType(type) else { throw protocolViolation("unknown chunk type \(type)") }
            guard length >= 6, length <= 6 + 4096 + 8 + 1024 else { throw protocolViolation("malformed error chunk") }
            let payload = try read(Int(length))
            let e: NBDChunk.ErrorPayload
            if type == NBD.ReplyType.error.rawValue || type == NBD.ReplyType.errorOffset.rawValue {
                do { e = try NBDChunk.decodeError(type: type, payload) } catch { throw protocolViolation(error.reason) }
            } else {
                var r = NBDReader(payload)
                e = NBDChunk.ErrorPayload(error: try r.u32(), message: "", offset: nil)
            }
            if req.error == nil { req.error = serverError(e.error, message: e.message, req: req) }
        }
    }

    // MARK: BlockDriver

    private func checkWritable(_ op: String) throws {
        if isReadOnly {
            throw BlockError(.readOnly, "Permission denied: NBD export is read-only", errno: EPERM, path: filename, operation: op)
        }
    }

    /// Reads `buffer.count` bytes at `offset` with NBD_CMD_READ, split to the server's maximum
    /// block size; bytes past the end of the export read as zeroes.
    /// - Throws: ``BlockError`` `.closed` after ``close()``, or `.io` when the server replies with an error or the connection is lost.
    public func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws {
        try await gate.run(filename, "read") { try await readAdmitted(at: offset, into: buffer) }
    }

    private func readAdmitted(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws {
        guard buffer.count > 0, let base = buffer.baseAddress else { return }
        let size = length
        // Past the end of the export reads as zeros (a format may read a little beyond).
        let inside = Int(max(0, min(Int64(buffer.count), size - offset)))
        if inside < buffer.count { memset(base + inside, 0, buffer.count - inside) }
        if inside == 0 { return }
        let a = minBlock
        if a > 1 && (offset % a != 0 || Int64(inside) % a != 0) {
            let start = offset / a * a
            let end = min((offset + Int64(inside) + a - 1) / a * a, size)
            let bounce = AlignedBuffer(count: Int(end - start))
            // SAFETY: `bounce` covers the aligned range around the request; the async closure keeps it
            // alive until the reply has been copied.
            try await bounce.withUnsafeMutableBytes { b in
                try await self.readAligned(at: start, into: b.baseAddress!, count: b.count)
                base.copyMemory(from: b.baseAddress! + Int(offset - start), byteCount: inside)
            }
            return
        }
        try await readAligned(at: offset, into: base, count: inside)
    }

    private func readAligned(at offset: Int64, into base: UnsafeMutableRawPointer, count: Int) async throws {
        var done = 0
        while done < count {
            let n = Int(min(Int64(count - done), maxPayload))
            try await perform(.read, offset: offset + Int64(done), length: n, into: base + done, operation: "read")
            done += n
        }
    }

    /// Writes `buffer` at `offset` with NBD_CMD_WRITE (`.fua` sets NBD_CMD_FLAG_FUA), split to
    /// the server's maximum block size.
    /// - Throws: ``BlockError`` `.closed` after ``close()``, `.readOnly`, or `.io` on a server error or lost connection.
    public func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags) async throws {
        try await gate.run(filename, "write") { try await writeAdmitted(at: offset, from: buffer, flags: flags) }
    }

    private func writeAdmitted(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags) async throws {
        try checkWritable("write")
        guard buffer.count > 0, let base = buffer.baseAddress else { return }
        try checkRange(offset, Int64(buffer.count), "write")
        let a = minBlock
        if a > 1 && (offset % a != 0 || Int64(buffer.count) % a != 0) {
            let start = offset / a * a
            let end = (offset + Int64(buffer.count) + a - 1) / a * a
            let bounce = AlignedBuffer(count: Int(end - start))
            try await rmwLock.withLock {
                // SAFETY: `bounce` covers the aligned range around the write; the async closure keeps
                // it alive across the read-modify-write.
                try await bounce.withUnsafeMutableBytes { b in
                    try await self.readAligned(at: start, into: b.baseAddress!, count: b.count)
                    (b.baseAddress! + Int(offset - start)).copyMemory(from: base, byteCount: buffer.count)
                    try await self.writeAligned(at: start, from: UnsafeRawPointer(b.baseAddress!), count: b.count, flags: flags)
                }
            }
            return
        }
        try await writeAligned(at: offset, from: base, count: buffer.count, flags: flags)
    }

    private func checkRange(_ offset: Int64, _ count: Int64, _ op: String) throws {
        if offset < 0 || offset + count > length {
            throw BlockError(.noSpace, "Request beyond the end of the NBD export (\(length) bytes)", errno: ENOSPC,
                             path: filename, offset: offset, operation: op)
        }
    }

    private func commandFlags(_ flags: WriteFlags) -> NBD.CommandFlags {
        flags.contains(.fua) && info.flags.contains(.sendFUA) ? [.fua] : []
    }

    /// Flushes after a FUA request the server could not take with the FUA flag.
    private func emulateFUA(_ flags: WriteFlags) async throws {
        if flags.contains(.fua) && !info.flags.contains(.sendFUA) { try await flushAdmitted() }
    }

    private func writeAligned(at offset: Int64, from base: UnsafeRawPointer, count: Int, flags: WriteFlags) async throws {
        var done = 0
        while done < count {
            let n = Int(min(Int64(count - done), maxPayload))
            try await perform(.write, flags: commandFlags(flags), offset: offset + Int64(done), length: n,
                              payload: base + done, operation: "write")
            done += n
        }
        try await emulateFUA(flags)
    }

    /// Makes `length` bytes at `offset` read as zeroes with NBD_CMD_WRITE_ZEROES (`.mayUnmap`
    /// clears NO_HOLE, `.noFallback` needs NBD_CMD_FLAG_FAST_ZERO), else by writing zeroes.
    /// - Throws: ``BlockError`` `.closed` after ``close()``, `.readOnly`, `.unsupported` with `.noFallback` when the server cannot zero fast,
    ///   or `.io`.
    public func writeZeroes(at offset: Int64, length: Int64, flags: WriteFlags) async throws {
        try await gate.run(filename, "write zeroes") { try await writeZeroesAdmitted(at: offset, length: length, flags: flags) }
    }

    private func writeZeroesAdmitted(at offset: Int64, length: Int64, flags: WriteFlags) async throws {
        try checkWritable("write zeroes")
        guard length > 0 else { return }
        try checkRange(offset, length, "write zeroes")
        let canZero = info.flags.contains(.sendWriteZeroes)
        if flags.contains(.noFallback) && !(canZero && info.flags.contains(.sendFastZero)) {
            throw BlockError(.unsupported, "write zeroes cannot be done efficiently", errno: ENOTSUP, path: filename,
                             offset: offset, operation: "write zeroes")
        }
        let a = minBlock
        let alignedStart = (offset + a - 1) / a * a
        let alignedEnd = (offset + length) / a * a
        if !canZero || alignedEnd <= alignedStart {
            try await writeZeroBuffers(at: offset, length: length, flags: flags)
            return
        }
        if alignedStart > offset { try await writeZeroBuffers(at: offset, length: alignedStart - offset, flags: flags) }
        var cflags = commandFlags(flags)
        if !flags.contains(.mayUnmap) { cflags.insert(.noHole) }
        if flags.contains(.noFallback) { cflags.insert(.fastZero) }
        var pos = alignedStart
        while pos < alignedEnd {
            let n = min(alignedEnd - pos, maxNoPayload)
            try await perform(.writeZeroes, flags: cflags, offset: pos, length: Int(n), operation: "write zeroes")
            pos += n
        }
        if offset + length > alignedEnd {
            try await writeZeroBuffers(at: alignedEnd, length: offset + length - alignedEnd, flags: flags)
        }
        try await emulateFUA(flags)
    }

    private func writeZeroBuffers(at offset: Int64, length: Int64, flags: WriteFlags) async throws {
        let chunk = Int(min(length, maxPayload))
        let zeros = AlignedBuffer(count: chunk)
        var pos = offset
        while pos < offset + length {
            let n = Int(min(Int64(chunk), offset + length - pos))
            // SAFETY: `zeros` is kept alive by the async closure; every write takes at most
            // `zeros.count` bytes from it.
            try await zeros.withUnsafeBytes { b in
                try await self.writeAdmitted(at: pos, from: UnsafeRawBufferPointer(rebasing: b[0..<n]), flags: flags)
            }
            pos += Int64(n)
        }
    }

    /// Sends NBD_CMD_TRIM for the range; does nothing when the server does not support trim
    /// (discard is advisory).
    /// - Throws: ``BlockError`` `.closed` after ``close()``, `.readOnly`, or `.io`.
    public func discard(at offset: Int64, length: Int64) async throws {
        try await gate.run(filename, "discard") { try await discardAdmitted(at: offset, length: length) }
    }

    private func discardAdmitted(at offset: Int64, length: Int64) async throws {
        try checkWritable("discard")
        guard length > 0, info.flags.contains(.sendTrim) else { return }
        let a = minBlock
        let start = (offset + a - 1) / a * a
        let end = min(offset + length, self.length) / a * a
        var pos = start
        while pos < end {
            let n = min(end - pos, maxNoPayload)
            try await perform(.trim, offset: pos, length: Int(n), operation: "discard")
            pos += n
        }
    }

    /// Sends NBD_CMD_FLUSH; does nothing for a read-only node or a server without flush.
    /// - Throws: ``BlockError`` `.closed` after ``close()``, or `.io`.
    public func flush() async throws {
        try await gate.run(filename, "flush") { try await flushAdmitted() }
    }

    private func flushAdmitted() async throws {
        guard !isReadOnly, info.flags.contains(.sendFlush) else { return }
        try await perform(.flush, offset: 0, length: 0, operation: "flush")
    }

    /// Block status from `base:allocation`: a hole is not data, a zero run reads as zeros;
    /// every run is allocated at this node, as QEMU's nbd driver reports it.
    public func blockStatus(at offset: Int64, length: Int64) async throws -> BlockStatus {
        try await gate.run(filename, "block status") { try await blockStatusAdmitted(at: offset, length: length) }
    }

    private func blockStatusAdmitted(at offset: Int64, length: Int64) async throws -> BlockStatus {
        let size = self.length
        if offset >= size {
            return BlockStatus(flags: [.zero, .allocated], length: max(1, length), hostOffset: offset)
        }
        let wanted = max(1, min(length, size - offset))
        guard let ctx = info.baseAllocationID else {
            return BlockStatus(flags: [.data, .allocated], length: wanted, hostOffset: offset)
        }
        let a = minBlock
        let start = offset / a * a
        let end = min((offset + wanted + a - 1) / a * a, size, start + maxNoPayload)
        let req = try await perform(.blockStatus, flags: [.reqOne], offset: start, length: Int(end - start),
                                    operation: "block status")
        guard let ext = req.extents[ctx] else {
            throw BlockError(.io, "NBD server did not reply with any status extents", errno: EIO, path: filename,
                             offset: offset, operation: "block status")
        }
        let extEnd = start + Int64(ext.length)
        // An extent shorter than the alignment slack: report one aligned block as data.
        guard extEnd > offset else {
            return BlockStatus(flags: [.data, .allocated], length: min(wanted, end - offset), hostOffset: offset)
        }
        var flags: BlockStatus.Flags = [.allocated]
        if ext.flags & NBD.stateHole == 0 { flags.insert(.data) }
        if ext.flags & NBD.stateZero != 0 { flags.insert(.zero) }
        return BlockStatus(flags: flags, length: min(wanted, extEnd - offset), hostOffset: offset)
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
