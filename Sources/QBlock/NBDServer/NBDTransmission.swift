import QBlockNBDWire
/// The transmission phase of an NBD connection (`doc/proto.md`, "Transmission") as a state
/// machine without I/O: each request header goes in, a decision comes out — what payload to
/// read, whether to execute the command or which error to reply, when to close. Reply
/// encoding (simple or structured) and the pure parts of READ and BLOCK_STATUS replies
/// live here too, so the connection that drives it only moves bytes and calls the node.
///
/// The checks and their order are qemu-nbd 7.2's (`nbd_co_receive_request`).
public struct NBDTransmission: Sendable {
    /// A validated command, ready to run.
    public enum Command: Sendable, Equatable {
        case read(offset: UInt64, length: UInt32, dontFragment: Bool)
        case write(offset: UInt64, length: UInt32, fua: Bool)
        case flush
        case trim(offset: UInt64, length: UInt32, fua: Bool)
        case cache(offset: UInt64, length: UInt32)
        case writeZeroes(offset: UInt64, length: UInt32, fua: Bool, noHole: Bool, fastZero: Bool)
        case blockStatus(offset: UInt64, length: UInt32, reqOne: Bool)
    }

    /// What the connection does with one request header.
    public enum Decision: Sendable, Equatable {
        /// Read `payload` bytes (the data of a write) and run the command.
        case execute(Command, cookie: UInt64, payload: Int)
        /// Read and drop `discard` payload bytes, reply with `error`; then close the
        /// connection if `close` (the stream cannot be resynchronized).
        case reject(cookie: UInt64, error: NBD.WireError, message: String, discard: Int, close: Bool)
        /// NBD_CMD_DISC: finish the requests in flight, then close.
        case disconnect
        /// A broken stream (bad magic): close at once.
        case close
    }

    /// The export's size in bytes; requests beyond it are refused with EINVAL.
    public let size: UInt64
    /// The transmission flags the handshake sent (they decide which commands are allowed).
    public let flags: NBD.TransmissionFlags
    /// Whether replies may be structured (else every reply is simple).
    public let structuredReplies: Bool
    /// The metadata contexts NBD_CMD_BLOCK_STATUS reports, in chunk order.
    public let contexts: [NBDMetaContext]
    /// Whether the connection is to be closed (a disconnect or a broken stream was seen).
    public private(set) var isClosed = false

    /// Creates the state machine for an export of `size` bytes with what the handshake settled.
    public init(size: UInt64, flags: NBD.TransmissionFlags, structuredReplies: Bool, contexts: [NBDMetaContext]) {
        self.size = size
        self.flags = flags
        self.structuredReplies = structuredReplies
        self.contexts = contexts
    }

    /// Creates the state machine for what a finished handshake settled.
    public init(_ n: NBDNegotiated) {
        self.init(size: n.export.size, flags: n.flags, structuredReplies: n.structuredReplies, contexts: n.contexts)
    }

    /// The largest number of extents one BLOCK_STATUS reply carries per context (qemu's
    /// NBD_MAX_BLOCK_STATUS_EXTENTS).
    public static let maxExtents = (1 << 20) / 8

    /// Decides what to do with one 28-byte request header.
    public mutating func receive(header: [UInt8]) -> Decision {
        guard !isClosed else { return .close }
        guard let req = NBDRequest.decode(header) else {
            isClosed = true
            return .close
        }
        let d = decide(req)
        switch d {
        case .disconnect, .close: isClosed = true
        case .reject(_, _, _, _, true): isClosed = true
        default: break
        }
        return d
    }

    private func decide(_ r: NBDRequest) -> Decision {
        let cookie = r.cookie
        func reject(_ e: NBD.WireError, _ m: String, discard: Int = 0, close: Bool = false) -> Decision {
            .reject(cookie: cookie, error: e, message: m, discard: discard, close: close)
        }
        let cmd = r.command
        if cmd == .disconnect { return .disconnect }
        let payload = cmd == .write ? Int(r.length) : 0
        if cmd == .read || cmd == .write || cmd == .cache, r.length > NBD.maxPayload {
            // A write's data cannot be skipped safely at this size: reply, then disconnect.
            return reject(.inval, "len (\(r.length)) is larger than max len (\(NBD.maxPayload))", close: cmd == .write)
        }
        if flags.contains(.readOnly), cmd == .write || cmd == .writeZeroes || cmd == .trim {
            return reject(.perm, "Export is read-only", discard: payload)
        }
        if r.offset > size || UInt64(r.length) > size - r.offset {
            let e: NBD.WireError = (cmd == .write || cmd == .writeZeroes) ? .nospc : .inval
            return reject(e, "operation past EOF; From: \(r.offset), Len: \(r.length), Size: \(size)", discard: payload)
        }
        var valid: NBD.CommandFlags = [.fua]
        if cmd == .read && structuredReplies {
            valid.insert(.dontFragment)
        } else if cmd == .writeZeroes {
            valid.formUnion([.noHole, .fastZero])
        } else if cmd == .blockStatus {
            valid.insert(.reqOne)
        }
        if !r.flags.subtracting(valid).isEmpty {
            return reject(.inval, "unsupported flags for command (got 0x\(String(r.flags.rawValue, radix: 16)))", discard: payload)
        }
        let fua = r.flags.contains(.fua)
        switch cmd {
        case .read:
            return .execute(.read(offset: r.offset, length: r.length, dontFragment: r.flags.contains(.dontFragment)),
                            cookie: cookie, payload: 0)
        case .write:
            return .execute(.write(offset: r.offset, length: r.length, fua: fua), cookie: cookie, payload: payload)
        case .flush:
            return .execute(.flush, cookie: cookie, payload: 0)
        case .trim:
            return .execute(.trim(offset: r.offset, length: r.length, fua: fua), cookie: cookie, payload: 0)
        case .cache:
            return .execute(.cache(offset: r.offset, length: r.length), cookie: cookie, payload: 0)
        case .writeZeroes:
            return .execute(.writeZeroes(offset: r.offset, length: r.length, fua: fua, noHole: r.flags.contains(.noHole),
                                         fastZero: r.flags.contains(.fastZero)), cookie: cookie, payload: 0)
        case .blockStatus:
            if r.length == 0 { return reject(.inval, "need non-zero length") }
            if contexts.isEmpty { return reject(.inval, "CMD_BLOCK_STATUS not negotiated") }
            return .execute(.blockStatus(offset: r.offset, length: r.length, reqOne: r.flags.contains(.reqOne)),
                            cookie: cookie, payload: 0)
        default:
            return reject(.inval, "unsupported operation \(r.type)")
        }
    }

    // MARK: - Replies

    /// The reply for a command that failed: an error chunk with structured replies, else a
    /// simple reply carrying the error.
    public func errorReply(cookie: UInt64, error: NBD.WireError, message: String) -> [UInt8] {
        structuredReplies ? NBDEncode.errorChunk(cookie: cookie, error: error, message: message)
                          : NBDEncode.simpleReplyHeader(error: error, cookie: cookie)
    }

    /// The reply for a command without data that succeeded.
    public func successReply(cookie: UInt64) -> [UInt8] {
        structuredReplies ? NBDEncode.doneChunk(cookie: cookie) : NBDEncode.simpleReplyHeader(error: .ok, cookie: cookie)
    }

    /// A run of a READ reply: data to send, or a hole the client fills with zeros.
    public enum ReadPiece: Sendable, Equatable {
        case data(offset: UInt64, length: UInt32)
        case hole(offset: UInt64, length: UInt32)
    }

    /// Plans a sparse structured READ reply from runs of (length, reads-as-zero) that cover
    /// `[offset, offset+length)`: adjacent runs of one kind are merged; runs past the
    /// request are cut.
    public static func readPieces(offset: UInt64, length: UInt32, runs: [(length: Int64, zero: Bool)]) -> [ReadPiece] {
        var out: [ReadPiece] = []
        var pos = offset
        let end = offset + UInt64(length)
        for run in runs where pos < end && run.length > 0 {
            let n = UInt32(min(UInt64(run.length), end - pos))
            switch out.last {
            case .data(let o, let l)? where !run.zero:
                out[out.count - 1] = .data(offset: o, length: l + n)
            case .hole(let o, let l)? where run.zero:
                out[out.count - 1] = .hole(offset: o, length: l + n)
            default:
                out.append(run.zero ? .hole(offset: pos, length: n) : .data(offset: pos, length: n))
            }
            pos += UInt64(n)
        }
        if pos < end { out.append(.data(offset: pos, length: UInt32(end - pos))) }
        return out
    }

    /// The header of an OFFSET_DATA chunk (the data follows it).
    public static func dataChunkHeader(cookie: UInt64, offset: UInt64, length: UInt32, done: Bool) -> [UInt8] {
        var w = NBDWriter(capacity: 28)
        w.append(NBDEncode.chunkHeader(flags: done ? NBD.replyFlagDone : 0, type: .offsetData, cookie: cookie, length: 8 + length))
        w.u64(offset)
        return w.bytes
    }

    /// Adds a run to a list of extents, merging it with the last one when the flags match;
    /// returns false once the list is full (`limit` extents) and the run was not added.
    public static func addExtent(_ extents: inout [(UInt32, UInt32)], length: UInt32, flags: UInt32, limit: Int) -> Bool {
        if let last = extents.last, last.1 == flags, UInt64(last.0) + UInt64(length) <= UInt64(UInt32.max) {
            extents[extents.count - 1].0 += length
            return true
        }
        guard extents.count < limit else { return false }
        extents.append((length, flags))
        return true
    }

    /// base:allocation flags for a status: HOLE unless data, ZERO if it reads as zeros.
    public static func allocationFlags(data: Bool, zero: Bool) -> UInt32 {
        (data ? 0 : NBD.stateHole) | (zero ? NBD.stateZero : 0)
    }
}
