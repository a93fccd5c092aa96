#if canImport(Glibc)
import Glibc
#endif
import Foundation
import QBlockCore
import QBlockGraph
import QBlockNBDWire

/// Requests in flight: each waits for both its reply (from the reader thread) and the end
/// of its send (on a pool thread).
extension NBDClientNode {
    /// A request waiting for its reply.
    // @unchecked Sendable: `error` and `extents` are written by the reader thread before it
    // completes the request and read by the task only after; `sent`, `replied` and
    // `continuation` are only touched with the node's `lock` held.
    final class Request: @unchecked Sendable {
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

    func closedError(_ op: String) -> BlockError {
        CloseGate.closedError(filename, op)
    }

    /// Sends one request and waits for its reply.
    /// - Returns: the request, with its error or extents.
    @discardableResult
    func perform(_ command: NBD.Command, flags: NBD.CommandFlags = [], offset: Int64, length: Int,
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
    func connectionFailed(_ error: BlockError) {
        lock.withLock { if failure == nil { failure = error } }
        socket.shutdown()
    }

    /// Marks `req` as answered (with whatever error it collected) and resumes its task
    /// if its send has finished too.
    func complete(_ cookie: UInt64, _ req: Request) {
        let resume: UnsafeContinuation<Void, Never>? = lock.withLock {
            inflight[cookie] = nil
            req.replied = true
            if req.sent { defer { req.continuation = nil }; return req.continuation }
            return nil
        }
        resume?.resume()
    }
}
