#if canImport(Glibc)
import Glibc
#endif
import Foundation
import QBlockCore
import QBlockGraph
import QBlockNBDWire

/// The reader thread: replies matched to requests by cookie, data read straight into the
/// waiting request's buffer, and the end of the connection.
extension NBDClientNode {
    func startReader() {
        let t = Thread { [self] in
            readerLoop()
        }
        t.name = "qblock-nbd-reader"
        t.stackSize = 256 * 1024
        t.start()
    }

    func protocolViolation(_ reason: String) -> BlockError {
        BlockError(.io, "NBD protocol error: \(reason)", errno: EPROTO, path: filename, operation: "nbd")
    }

    /// Reads replies until the connection ends, then fails whatever is still pending.
    func readerLoop() {
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

    func read(_ count: Int) throws -> [UInt8] {
        try socket.readExactly(count).get()
    }

    func readInto(_ p: UnsafeMutableRawPointer, _ count: Int) throws {
        if count == 0 { return }
        if let e = socket.readExactly(p, count) { throw NBDSocketError(errno: e) }
    }

    /// The error a server reported for a request.
    func serverError(_ wire: UInt32, message: String, req: Request) -> BlockError {
        // Values are the protocol's errno subset (Linux numbering); anything else is EINVAL.
        let known: Set<UInt32> = [1, 5, 12, 22, 28, 75, 95, 108]
        let err = known.contains(wire) ? Int32(wire) : EINVAL
        var e = BlockError.system(err, operationName(req.command), path: filename, offset: Int64(req.offset))
        if !message.isEmpty {
            e.underlying = BlockError(e.code, "server reported: \(message)", errno: err, path: filename)
        }
        return e
    }

    func operationName(_ c: NBD.Command) -> String {
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

    func readOneReply() throws {
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

    func readChunk(_ req: Request, type: UInt16, length: UInt32) throws {
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
}
