import QBlockNBDWire
/// A metadata context a client can select with NBD_OPT_SET_META_CONTEXT. ``rawValue``
/// is the context id sent on the wire (the ids qemu-nbd uses: 0, 1, then 2 + the
/// bitmap's index for `qemu:dirty-bitmap:NAME`).
public enum NBDMetaContext: Sendable, Hashable, Comparable {
    /// `base:allocation`: HOLE and ZERO flags.
    case baseAllocation
    /// `qemu:allocation-depth`: 0 unallocated, 1 the top image, 2 its backing file, ...
    case allocationDepth
    /// `qemu:dirty-bitmap:NAME` for the export's bitmap at this index: flag 1 (DIRTY) or 0.
    case dirtyBitmap(Int)

    /// The context id.
    public var rawValue: UInt32 {
        switch self {
        case .baseAllocation: return 0
        case .allocationDepth: return 1
        case .dirtyBitmap(let i): return 2 + UInt32(i)
        }
    }

    public static func < (a: NBDMetaContext, b: NBDMetaContext) -> Bool { a.rawValue < b.rawValue }

    /// The context's name for `export`.
    public func name(in export: NBDExportDescriptor) -> String {
        switch self {
        case .baseAllocation: return NBD.contextBaseAllocation
        case .allocationDepth: return NBD.contextAllocationDepth
        case .dirtyBitmap(let i): return NBD.contextDirtyBitmapPrefix + export.bitmapNames[i]
        }
    }
}

/// What the handshake settled for the transmission phase.
public struct NBDNegotiated: Sendable, Equatable {
    /// The export the client chose.
    public var export: NBDExportDescriptor
    /// The transmission flags sent to the client (the export's, plus SEND_DF with
    /// structured replies).
    public var flags: NBD.TransmissionFlags
    /// Whether the client asked for structured replies (NBD_OPT_STRUCTURED_REPLY).
    public var structuredReplies: Bool
    /// The selected metadata contexts, in the order their chunks are sent.
    public var contexts: [NBDMetaContext]
}

/// The server side of the fixed newstyle NBD handshake (the NBD project's `doc/proto.md`,
/// "Newstyle negotiation" and "Option haggling") as a state machine without I/O: the
/// driver sends ``greeting``, then repeatedly reads exactly ``bytesWanted`` bytes, hands
/// them to ``receive(_:)`` and performs the returned actions in order.
///
/// Replies follow qemu-nbd 7.2 (`nbd/server.c`): which INFO items are sent, the order of
/// META_CONTEXT replies, which options need structured replies first.
public struct NBDServerHandshake: Sendable {
    /// What the driver of the handshake does next, in the order returned.
    public enum Action: Sendable, Equatable {
        /// Write these bytes to the client.
        case send([UInt8])
        /// Close the connection (after sending what came before).
        case close
        /// The handshake is over: enter the transmission phase.
        case transmit(NBDNegotiated)
    }

    private enum State: Sendable, Equatable {
        case clientFlags
        case optionHeader
        case optionPayload(option: UInt32, length: Int)
        case finished
    }

    private let exports: [NBDExportDescriptor]
    private var state = State.clientFlags
    private var fixedNewstyle = false
    private var noZeroes = false
    private var structuredReplies = false
    /// The contexts selected by the last SET_META_CONTEXT, and the export they are for.
    private var selected: (export: String, contexts: [NBDMetaContext])?
    /// Options received so far (for tests and diagnostics).
    public private(set) var optionCount = 0

    /// - Parameter exports: the exports offered, in the order NBD_OPT_LIST reports them.
    public init(exports: [NBDExportDescriptor]) {
        self.exports = exports
    }

    /// The greeting to send first: magic, IHAVEOPT, FIXED_NEWSTYLE | NO_ZEROES.
    public var greeting: [UInt8] { NBDEncode.greeting([.fixedNewstyle, .noZeroes]) }

    /// How many bytes the machine needs next (0 once it has finished).
    public var bytesWanted: Int {
        switch state {
        case .clientFlags: return 4
        case .optionHeader: return 16
        case .optionPayload(_, let length): return length
        case .finished: return 0
        }
    }

    /// Whether the handshake ended (with ``Action/transmit(_:)`` or ``Action/close``).
    public var isFinished: Bool { state == .finished }

    /// Feeds exactly ``bytesWanted`` bytes.
    public mutating func receive(_ bytes: [UInt8]) -> [Action] {
        guard bytes.count == bytesWanted else { return finish([.close]) }
        var r = NBDReader(bytes)
        switch state {
        case .clientFlags:
            guard let raw = try? r.u32() else { return finish([.close]) }
            let flags = NBD.ClientFlags(rawValue: raw)
            // Unknown client flags: the protocol says to disconnect.
            guard flags.subtracting([.fixedNewstyle, .noZeroes]).isEmpty else { return finish([.close]) }
            fixedNewstyle = flags.contains(.fixedNewstyle)
            noZeroes = flags.contains(.noZeroes)
            state = .optionHeader
            return []
        case .optionHeader:
            guard let magic = try? r.u64(), magic == NBD.optionMagic,
                  let option = try? r.u32(), let length = try? r.u32() else { return finish([.close]) }
            optionCount += 1
            if length > NBD.maxOptionLength {
                // Unwilling to read a payload this large: say so and disconnect, as the
                // protocol allows (we cannot resynchronize without reading it).
                let reply = NBDEncode.optionError(option: option, type: .errTooBig,
                                                  message: "option \(option) payload of \(length) bytes is too large")
                return finish(fixedNewstyle ? [.send(reply), .close] : [.close])
            }
            if length == 0 { return handle(option: option, payload: []) }
            state = .optionPayload(option: option, length: Int(length))
            return []
        case .optionPayload(let option, _):
            state = .optionHeader
            return handle(option: option, payload: bytes)
        case .finished:
            return [.close]
        }
    }

    private mutating func finish(_ actions: [Action]) -> [Action] {
        state = .finished
        return actions
    }

    private func export(named name: String) -> NBDExportDescriptor? {
        exports.first { $0.name == name }
    }

    private func transmissionFlags(_ e: NBDExportDescriptor) -> NBD.TransmissionFlags {
        structuredReplies ? e.flags.union(.sendDF) : e.flags
    }

    private func negotiated(_ e: NBDExportDescriptor) -> NBDNegotiated {
        let contexts = (selected?.export == e.name) ? (selected?.contexts ?? []) : []
        return NBDNegotiated(export: e, flags: transmissionFlags(e), structuredReplies: structuredReplies, contexts: contexts)
    }

    private mutating func handle(option: UInt32, payload: [UInt8]) -> [Action] {
        state = .optionHeader
        let known = NBD.Option(rawValue: option)
        if known == .exportName {
            let name = String(decoding: payload, as: UTF8.self)
            guard payload.count <= NBD.maxStringLength, let e = export(named: name) else {
                // NBD_OPT_EXPORT_NAME has no error reply: disconnect.
                return finish([.close])
            }
            let reply = NBDEncode.exportNameReply(size: e.size, flags: transmissionFlags(e), noZeroes: noZeroes)
            return finish([.send(reply), .transmit(negotiated(e))])
        }
        // A client without FIXED_NEWSTYLE cannot parse option replies.
        guard fixedNewstyle else { return finish([.close]) }
        func error(_ type: NBD.OptionReply, _ message: String) -> [Action] {
            [.send(NBDEncode.optionError(option: option, type: type, message: message))]
        }
        let ack = Action.send(NBDEncode.optionReply(option: option, type: .ack))
        switch known {
        case .abort:
            return finish([ack, .close])
        case .list:
            guard payload.isEmpty else { return error(.errInvalid, "request NBD_OPT_LIST with nonzero length") }
            var out: [Action] = exports.map { e in
                var w = NBDWriter()
                w.lengthPrefixed(e.name)
                if let d = e.description { w.string(d) }
                return .send(NBDEncode.optionReply(option: option, type: .server, payload: w.bytes))
            }
            out.append(ack)
            return out
        case .startTLS:
            guard payload.isEmpty else { return error(.errInvalid, "request NBD_OPT_STARTTLS with nonzero length") }
            return error(.errPolicy, "TLS not configured")
        case .info, .go:
            guard let req = NBDInfoRequest.decode(payload) else {
                return error(.errInvalid, "request data of option \(known == .go ? "NBD_OPT_GO" : "NBD_OPT_INFO") is malformed")
            }
            guard let e = export(named: req.exportName) else {
                return error(.errUnknown, "export '\(req.exportName)' not present")
            }
            var out: [Action] = []
            func info(_ type: NBD.Info, _ fill: (inout NBDWriter) -> Void) {
                var w = NBDWriter()
                w.u16(type.rawValue)
                fill(&w)
                out.append(.send(NBDEncode.optionReply(option: option, type: .info, payload: w.bytes)))
            }
            if req.requests.contains(NBD.Info.name.rawValue) { info(.name) { $0.string(e.name) } }
            if let d = e.description { info(.description) { $0.string(d) } }
            // As qemu-nbd: the real minimum only to a client that will honour it (it asked
            // for block sizes, or only asks for information), 1 to the others.
            let minimum = known == .info || req.requests.contains(NBD.Info.blockSize.rawValue)
                ? min(e.requestAlignment, NBD.maxPayload) : 1
            info(.blockSize) {
                $0.u32(minimum)
                $0.u32(max(4096, minimum))
                $0.u32(NBD.maxPayload)
            }
            info(.export) {
                $0.u64(e.size)
                $0.u16(transmissionFlags(e).rawValue)
            }
            out.append(ack)
            if known == .go {
                out.append(.transmit(negotiated(e)))
                state = .finished
            }
            return out
        case .structuredReply:
            guard payload.isEmpty else { return error(.errInvalid, "request NBD_OPT_STRUCTURED_REPLY with nonzero length") }
            guard !structuredReplies else { return error(.errInvalid, "structured reply already negotiated") }
            structuredReplies = true
            return [ack]
        case .listMetaContext, .setMetaContext:
            let name = known == .setMetaContext ? "NBD_OPT_SET_META_CONTEXT" : "NBD_OPT_LIST_META_CONTEXT"
            guard structuredReplies else {
                return error(.errInvalid, "request option '\(name)' when structured reply is not negotiated")
            }
            guard let req = NBDMetaContextRequest.decode(payload) else {
                return error(.errInvalid, "request data of option \(name) is malformed")
            }
            guard let e = export(named: req.exportName) else {
                return error(.errUnknown, "export '\(req.exportName)' not present")
            }
            let isList = known == .listMetaContext
            var matched = Set<NBDMetaContext>()
            if isList && req.queries.isEmpty {
                matched.insert(.baseAllocation)
                if e.allocationDepth { matched.insert(.allocationDepth) }
                for i in e.bitmapNames.indices { matched.insert(.dirtyBitmap(i)) }
            }
            for q in req.queries {
                matched.formUnion(Self.match(query: q, list: isList, export: e))
            }
            let contexts = matched.sorted()
            var out: [Action] = contexts.map { c in
                var w = NBDWriter()
                w.u32(c.rawValue)
                w.string(c.name(in: e))
                return .send(NBDEncode.optionReply(option: option, type: .metaContext, payload: w.bytes))
            }
            if !isList { selected = (e.name, contexts) }
            out.append(ack)
            return out
        default:
            return error(.errUnsupported, "Unsupported option \(option)")
        }
    }

    /// The contexts one query names: exact names select; with LIST, the bare namespaces
    /// `base:` and `qemu:` list everything in them.
    static func match(query: String, list: Bool, export: NBDExportDescriptor) -> Set<NBDMetaContext> {
        if query.hasPrefix("base:") {
            let rest = query.dropFirst(5)
            return (rest == "allocation" || (list && rest.isEmpty)) ? [.baseAllocation] : []
        }
        if query.hasPrefix("qemu:") {
            let rest = query.dropFirst(5)
            let bitmaps = Set(export.bitmapNames.indices.map { NBDMetaContext.dirtyBitmap($0) })
            if rest.isEmpty {
                guard list else { return [] }
                return bitmaps.union(export.allocationDepth ? [.allocationDepth] : [])
            }
            if rest == "allocation-depth" { return export.allocationDepth ? [.allocationDepth] : [] }
            if rest.hasPrefix("dirty-bitmap:") {
                let name = rest.dropFirst("dirty-bitmap:".count)
                if name.isEmpty { return list ? bitmaps : [] }
                if let i = export.bitmapNames.firstIndex(where: { $0 == name }) { return [.dirtyBitmap(i)] }
            }
            return []
        }
        return []
    }
}
