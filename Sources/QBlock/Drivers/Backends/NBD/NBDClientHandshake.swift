import QBlockCore
import QBlockNBDWire
/// What the handshake learnt about an export.
public struct NBDExportInfo: Sendable, Equatable {
    /// The export name that was asked for.
    public var exportName: String
    /// Export size in bytes.
    public var size: UInt64
    /// The export's transmission flags (read-only, flush, FUA, trim, write zeroes, ...).
    public var flags: NBD.TransmissionFlags
    /// Block size constraints (NBD_INFO_BLOCK_SIZE), or the protocol's defaults.
    public var minimumBlockSize: UInt32 = 1
    /// The preferred request size in bytes (4096 unless the server says otherwise).
    public var preferredBlockSize: UInt32 = 4096
    /// The largest request payload in bytes (32 MiB unless the server says otherwise).
    public var maximumBlockSize: UInt32 = NBD.maxPayload
    /// Whether structured replies were negotiated.
    public var structuredReplies = false
    /// Negotiated metadata contexts, by name.
    public var metaContexts: [String: UInt32] = [:]
    /// The context whose flags block status reports: `base:allocation`, or the one given
    /// as `x-dirty-bitmap` (``NBDClientHandshake/statusContext``).
    public var statusContext: String = NBD.contextBaseAllocation
    /// The export's description, if the server sent one.
    public var exportDescription: String?
    /// True if the export was selected with the old NBD_OPT_EXPORT_NAME.
    public var usedExportName = false

    /// Creates the information for `exportName` of `size` bytes with `flags`; the rest has the
    /// protocol's defaults.
    public init(exportName: String, size: UInt64, flags: NBD.TransmissionFlags) {
        self.exportName = exportName
        self.size = size
        self.flags = flags
    }

    /// The context ID of `base:allocation`, if the server agreed to it.
    public var baseAllocationID: UInt32? { metaContexts[NBD.contextBaseAllocation] }
    /// The context ID of `qemu:allocation-depth`, if the server agreed to it.
    public var allocationDepthID: UInt32? { metaContexts[NBD.contextAllocationDepth] }
    /// The context ID of ``statusContext``, if the server agreed to it.
    public var statusContextID: UInt32? { metaContexts[statusContext] }
}

/// The client side of the NBD fixed newstyle handshake, as a state machine without I/O.
///
/// Every step returns an ``Action``: bytes to send and how many bytes to read next, or the
/// end of the handshake. The driver sends, reads exactly that many bytes and feeds them to
/// ``receive(_:)``. The client asks for, in order: NO_ZEROES (in its flags), structured
/// replies, the `base:allocation` and `qemu:allocation-depth` metadata contexts (when
/// structured replies were accepted; only the ``statusContext`` when one is given), then
/// NBD_OPT_GO with NBD_INFO_BLOCK_SIZE. A server that does not know NBD_OPT_GO (or is not
/// fixed-newstyle) gets NBD_OPT_EXPORT_NAME.
public struct NBDClientHandshake: Sendable {
    /// What the caller does next with the socket.
    public enum Action: Sendable {
        /// Send `bytes` (possibly none), then read exactly `receive` bytes and call ``receive(_:)``.
        case exchange(send: [UInt8], receive: Int)
        /// Send `bytes` (possibly none) and enter the transmission phase.
        case done(send: [UInt8], NBDExportInfo)
        /// The handshake failed; close the connection.
        case failed(BlockError)
    }

    /// Longest option reply payload accepted (descriptions and names are at most 4 KiB).
    static let maxReplyPayload: UInt32 = 64 * 1024

    private enum Phase: Sendable {
        case greeting
        case structuredReply
        case setMetaContext
        case go
        case exportName
        case finished
    }

    /// The export to select ("" for the server's default export).
    public let exportName: String
    /// Whether to ask for the `qemu:allocation-depth` context too.
    public let wantAllocationDepth: Bool
    /// The one metadata context to ask for in place of `base:allocation` (QEMU's
    /// `x-dirty-bitmap`, e.g. `qemu:dirty-bitmap:NAME`), or nil. The server must answer with
    /// that context or none; whether none is an error is the caller's decision.
    public let statusContext: String?
    private var phase = Phase.greeting
    private var pendingHeader: NBDOptionReplyHeader?
    private var noZeroes = false
    private var structured = false
    private var contexts: [String: UInt32] = [:]
    private var info: NBDExportInfo?
    private var blockSize: (UInt32, UInt32, UInt32)?
    private var description: String?

    /// Creates a handshake for `exportName`, asking for `statusContext` alone when given;
    /// ``start()`` gives the first action.
    public init(exportName: String, wantAllocationDepth: Bool = true, statusContext: String? = nil) {
        self.exportName = exportName
        self.wantAllocationDepth = wantAllocationDepth
        self.statusContext = statusContext
    }

    /// True while waiting for the reply to NBD_OPT_EXPORT_NAME (a server that does not know
    /// the export closes the connection instead of answering).
    public var isAwaitingExportReply: Bool { phase == .exportName }

    /// The first action: read the server's greeting.
    public func start() -> Action {
        .exchange(send: [], receive: 18)
    }

    /// Feeds the bytes the last action asked for.
    public mutating func receive(_ bytes: [UInt8]) -> Action {
        do {
            return try step(bytes)
        } catch let e as BlockError {
            phase = .finished
            return .failed(e)
        } catch {
            phase = .finished
            return .failed(error.asBlockError)
        }
    }

    private func protocolError(_ why: String) -> BlockError {
        BlockError(.io, "NBD protocol error during handshake: \(why)", errno: 71 /* EPROTO */, operation: "nbd handshake")
    }

    private func optionName(_ o: NBD.Option) -> String {
        switch o {
        case .structuredReply: return "NBD_OPT_STRUCTURED_REPLY"
        case .setMetaContext: return "NBD_OPT_SET_META_CONTEXT"
        case .go: return "NBD_OPT_GO"
        case .exportName: return "NBD_OPT_EXPORT_NAME"
        default: return "option \(o.rawValue)"
        }
    }

    private var currentOption: NBD.Option? {
        switch phase {
        case .structuredReply: return .structuredReply
        case .setMetaContext: return .setMetaContext
        case .go: return .go
        default: return nil
        }
    }

    private mutating func step(_ bytes: [UInt8]) throws -> Action {
        switch phase {
        case .greeting:
            return try greeting(bytes)
        case .exportName:
            return try exportNameReply(bytes)
        case .finished:
            throw protocolError("handshake already finished")
        case .structuredReply, .setMetaContext, .go:
            guard let option = currentOption else { throw protocolError("no option pending") }
            if let header = pendingHeader {
                pendingHeader = nil
                return try optionReply(option, header, bytes)
            }
            let header: NBDOptionReplyHeader
            do {
                header = try NBDOptionReplyHeader.decode(bytes)
            } catch {
                throw protocolError(error.reason)
            }
            guard header.option == option.rawValue else {
                throw protocolError("reply to option \(header.option) while waiting for \(optionName(option))")
            }
            guard header.length <= NBDClientHandshake.maxReplyPayload else {
                throw protocolError("option reply of \(header.length) bytes is too long")
            }
            if header.length > 0 {
                pendingHeader = header
                return .exchange(send: [], receive: Int(header.length))
            }
            return try optionReply(option, header, [])
        }
    }

    private mutating func greeting(_ b: [UInt8]) throws -> Action {
        var r = NBDReader(b)
        guard let magic = try? r.u64(), let second = try? r.u64(), let rawFlags = try? r.u16() else {
            throw protocolError("truncated greeting")
        }
        guard magic == NBD.initMagic else {
            throw protocolError("not an NBD server (bad magic 0x\(String(magic, radix: 16)))")
        }
        if second == NBD.oldstyleMagic {
            throw BlockError(.unsupported, "NBD server uses the old-style handshake, which is not supported",
                             operation: "nbd handshake")
        }
        guard second == NBD.optionMagic else { throw protocolError("bad newstyle magic 0x\(String(second, radix: 16))") }
        let flags = NBD.HandshakeFlags(rawValue: rawFlags)
        var client = NBD.ClientFlags()
        if flags.contains(.noZeroes) {
            client.insert(.noZeroes)
            noZeroes = true
        }
        guard flags.contains(.fixedNewstyle) else {
            // Plain newstyle: only NBD_OPT_EXPORT_NAME is understood.
            return sendExportName(prefix: NBDEncode.clientFlags(client))
        }
        client.insert(.fixedNewstyle)
        phase = .structuredReply
        return .exchange(send: NBDEncode.clientFlags(client) + NBDEncode.optionRequest(.structuredReply),
                         receive: NBDOptionReplyHeader.size)
    }

    private mutating func sendExportName(prefix: [UInt8] = []) -> Action {
        phase = .exportName
        // Structured replies and metadata contexts stay negotiated with EXPORT_NAME.
        return .exchange(send: prefix + NBDEncode.optionRequest(.exportName, payload: Array(exportName.utf8)),
                         receive: 10 + (noZeroes ? 0 : 124))
    }

    private mutating func sendGo() -> Action {
        phase = .go
        let req = NBDInfoRequest(exportName: exportName, requests: [NBD.Info.blockSize.rawValue])
        return .exchange(send: NBDEncode.optionRequest(.go, payload: req.encode()), receive: NBDOptionReplyHeader.size)
    }

    private mutating func exportNameReply(_ b: [UInt8]) throws -> Action {
        var r = NBDReader(b)
        guard let size = try? r.u64(), let flags = try? r.u16() else { throw protocolError("truncated export reply") }
        phase = .finished
        var i = try makeInfo(size: size, rawFlags: flags)
        i.usedExportName = true
        return .done(send: [], i)
    }

    private func makeInfo(size: UInt64, rawFlags: UInt16) throws -> NBDExportInfo {
        guard size <= UInt64(Int64.max) else { throw protocolError("export size \(size) is too large") }
        var flags = NBD.TransmissionFlags(rawValue: rawFlags)
        if !flags.contains(.hasFlags) { flags = [] }
        var i = NBDExportInfo(exportName: exportName, size: size, flags: flags)
        i.structuredReplies = structured
        i.metaContexts = structured ? contexts : [:]
        if let statusContext { i.statusContext = statusContext }
        i.exportDescription = description
        if let (mn, pref, mx) = blockSize {
            i.minimumBlockSize = mn
            i.preferredBlockSize = pref
            i.maximumBlockSize = mx
        } else {
            i.maximumBlockSize = UInt32(min(UInt64(NBD.maxPayload), max(size, 1)))
        }
        return i
    }

    /// The error QEMU reports for an option error reply, with the server's message as a hint.
    private func optionError(_ option: NBD.Option, _ h: NBDOptionReplyHeader, _ payload: [UInt8]) -> BlockError {
        let text: String
        var code = BlockError.Code.io
        switch h.replyType {
        case .errPolicy: text = "Requested option denied by server policy"; code = .permissionDenied
        case .errInvalid: text = "Server rejected invalid option \(optionName(option))"; code = .invalidArgument
        case .errPlatform: text = "Server lacks support for option \(optionName(option))"; code = .unsupported
        case .errTLSRequired: text = "TLS negotiation required before option \(optionName(option))"; code = .unsupported
        case .errUnknown: text = "Requested export not available"; code = .notFound
        case .errShutdown: text = "Server shutting down before option \(optionName(option))"
        case .errBlockSizeRequired: text = "Server requires INFO_BLOCK_SIZE for option \(optionName(option))"; code = .unsupported
        case .errTooBig: text = "Option payload too big"; code = .invalidArgument
        case .errUnsupported: text = "Server does not support option \(optionName(option))"; code = .unsupported
        default: text = "Unknown error code when asking for option \(optionName(option))"
        }
        let msg = String(decoding: payload, as: UTF8.self)
        // The server's text is a hint line of its own, as QEMU's (error_append_hint).
        return BlockError(code, msg.isEmpty ? text : "\(text)\nserver reported: \(msg)", operation: "nbd handshake")
    }

    private mutating func optionReply(_ option: NBD.Option, _ h: NBDOptionReplyHeader, _ payload: [UInt8]) throws -> Action {
        switch option {
        case .structuredReply:
            if h.replyType == .ack {
                guard payload.isEmpty else { throw protocolError("acknowledgement with a payload") }
                structured = true
                phase = .setMetaContext
                var queries = [NBD.contextBaseAllocation]
                if let statusContext {
                    queries = [statusContext]
                } else if wantAllocationDepth {
                    queries.append(NBD.contextAllocationDepth)
                }
                let req = NBDMetaContextRequest(exportName: exportName, queries: queries)
                return .exchange(send: NBDEncode.optionRequest(.setMetaContext, payload: req.encode()),
                                 receive: NBDOptionReplyHeader.size)
            }
            guard h.isError else { throw protocolError("unexpected reply type \(h.type) to NBD_OPT_STRUCTURED_REPLY") }
            structured = false
            return sendGo()

        case .setMetaContext:
            if h.replyType == .metaContext {
                var r = NBDReader(payload)
                guard let id = try? r.u32(), payload.count - 4 <= NBD.maxStringLength else {
                    throw protocolError("malformed NBD_REP_META_CONTEXT")
                }
                let name = String(decoding: payload[4...], as: UTF8.self)
                if let statusContext {
                    // QEMU's client asks for one context and takes no other, nor two.
                    guard name == statusContext else {
                        throw BlockError(.io, "Failed to negotiate meta context '\(statusContext)', server answered with different context '\(name)'",
                                         errno: 71 /* EPROTO */, operation: "nbd handshake")
                    }
                    guard contexts.isEmpty else {
                        throw BlockError(.io, "Server answered with more than one context", errno: 71 /* EPROTO */,
                                         operation: "nbd handshake")
                    }
                    contexts[name] = id
                } else if name == NBD.contextBaseAllocation || (wantAllocationDepth && name == NBD.contextAllocationDepth) {
                    contexts[name] = id
                } else {
                    throw protocolError("server selected unrequested metadata context '\(name)'")
                }
                return .exchange(send: [], receive: NBDOptionReplyHeader.size)
            }
            if h.replyType == .ack {
                guard payload.isEmpty else { throw protocolError("acknowledgement with a payload") }
                return sendGo()
            }
            guard h.isError else { throw protocolError("unexpected reply type \(h.type) to NBD_OPT_SET_META_CONTEXT") }
            contexts = [:]
            return sendGo()

        case .go:
            if h.replyType == .info {
                try parseInfo(payload)
                return .exchange(send: [], receive: NBDOptionReplyHeader.size)
            }
            if h.replyType == .ack {
                guard payload.isEmpty else { throw protocolError("acknowledgement with a payload") }
                guard let i = info else { throw protocolError("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT") }
                phase = .finished
                var result = try makeInfo(size: i.size, rawFlags: i.flags.rawValue)
                result.exportDescription = description
                return .done(send: [], result)
            }
            guard h.isError else { throw protocolError("unexpected reply type \(h.type) to NBD_OPT_GO") }
            if h.replyType == .errUnsupported {
                // An older server: select the export the old way.
                return sendExportName()
            }
            throw optionError(.go, h, payload)

        default:
            throw protocolError("unexpected option")
        }
    }

    private mutating func parseInfo(_ p: [UInt8]) throws {
        var r = NBDReader(p)
        guard let type = try? r.u16() else { throw protocolError("empty NBD_REP_INFO") }
        switch NBD.Info(rawValue: type) {
        case .export:
            guard p.count == 12, let size = try? r.u64(), let flags = try? r.u16() else {
                throw protocolError("malformed NBD_INFO_EXPORT")
            }
            guard size <= UInt64(Int64.max) else { throw protocolError("export size \(size) is too large") }
            info = NBDExportInfo(exportName: exportName, size: size, flags: NBD.TransmissionFlags(rawValue: flags))
        case .blockSize:
            guard p.count == 14, let mn = try? r.u32(), let pref = try? r.u32(), let mx = try? r.u32() else {
                throw protocolError("malformed NBD_INFO_BLOCK_SIZE")
            }
            guard mn > 0, mn & (mn - 1) == 0, mn <= 64 * 1024 else {
                throw protocolError("server minimum block size \(mn) is not valid")
            }
            guard pref > 0, pref & (pref - 1) == 0, pref >= mn else {
                throw protocolError("server preferred block size \(pref) is not valid")
            }
            guard mx >= mn, mx % mn == 0 || mx == UInt32.max else {
                throw protocolError("server maximum block size \(mx) is not valid")
            }
            // Never more than what this client sends at once.
            let cap = UInt32(NBD.maxPayload) / mn * mn
            blockSize = (mn, pref, min(mx == UInt32.max ? cap : mx, cap))
        case .description:
            description = String(decoding: p[2...], as: UTF8.self)
        case .name, .none:
            break // informational, or unknown: ignore
        }
    }
}
