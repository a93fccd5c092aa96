#if canImport(Glibc)
import Glibc
#endif
import QBlockCore
import QBlockNBDWire

/// One export of a server's list: what NBD_OPT_LIST, NBD_OPT_INFO and
/// NBD_OPT_LIST_META_CONTEXT tell about it (what `qemu-nbd --list` and `nbdinfo --list` print).
public struct NBDExportListing: Sendable, Equatable {
    /// The export's name.
    public var name: String
    /// The description the server listed with the name (empty if none).
    public var description: String
    /// Size, transmission flags and block sizes from NBD_OPT_INFO; nil when the server
    /// refused the option for this export.
    public var info: NBDExportInfo?
    /// Whether NBD_INFO_BLOCK_SIZE came back (else the block sizes are not known).
    public var hasBlockSizes: Bool
    /// The metadata contexts the server offers for the export, in its order (empty without
    /// structured replies).
    public var metaContexts: [String]
}

/// Asks an NBD server which exports it has, as `qemu-nbd --list` does: structured replies
/// first (metadata contexts can only be listed with them), NBD_OPT_LIST, then for each
/// export NBD_OPT_INFO (with NBD_INFO_BLOCK_SIZE) and NBD_OPT_LIST_META_CONTEXT with no
/// query (all contexts), and NBD_OPT_ABORT to finish.
public enum NBDExportList {
    /// Lists the exports of the server `uri` names (its export name is not used).
    /// - Throws: ``BlockError`` for a refused connection, a server that is not fixed-newstyle
    ///   or a protocol error, worded like the handshake's errors.
    public static func list(_ uri: NBDURI, pool: IOThreadPool = .shared) async throws -> [NBDExportListing] {
        let r: Result<[NBDExportListing], BlockError> = await pool.run {
            do {
                let sock = try NBDSocket.connect(uri)
                defer { sock.close() }
                sock.setReceiveTimeout(seconds: NBDClientNode.handshakeTimeoutSeconds)
                var session = Session(sock: sock, uri: uri)
                return .success(try session.run())
            } catch {
                return .failure(error.asBlockError)
            }
        }
        return try r.get()
    }

    /// The blocking conversation over one connection.
    struct Session {
        let sock: NBDSocket
        let uri: NBDURI

        func failure(_ why: String) -> BlockError {
            BlockError(.io, "NBD protocol error during handshake: \(why)", errno: 71 /* EPROTO */, path: uri.text,
                       operation: "nbd list")
        }

        func send(_ bytes: [UInt8]) throws {
            if let e = sock.writeAll(bytes) { throw NBDClientNode.lost(e, uri, handshake: true, exportReply: false) }
        }

        func receive(_ count: Int) throws -> [UInt8] {
            switch sock.readExactly(count) {
            case .success(let b): return b
            case .failure(let e): throw NBDClientNode.lost(e.errno, uri, handshake: true, exportReply: false)
            }
        }

        /// Reads one option reply to `option`: its header and payload.
        func reply(to option: NBD.Option) throws -> (NBDOptionReplyHeader, [UInt8]) {
            let h: NBDOptionReplyHeader
            do { h = try NBDOptionReplyHeader.decode(try receive(NBDOptionReplyHeader.size)) } catch let e as NBDProtocolViolation {
                throw failure(e.reason)
            }
            guard h.option == option.rawValue else { throw failure("reply to option \(h.option) while waiting for \(option.rawValue)") }
            guard h.length <= NBDClientHandshake.maxReplyPayload else { throw failure("option reply of \(h.length) bytes is too long") }
            return (h, h.length > 0 ? try receive(Int(h.length)) : [])
        }

        mutating func run() throws -> [NBDExportListing] {
            let greeting = try receive(18)
            var r = NBDReader(greeting)
            guard let magic = try? r.u64(), let second = try? r.u64(), let rawFlags = try? r.u16(), magic == NBD.initMagic else {
                throw failure("not an NBD server")
            }
            guard second == NBD.optionMagic else {
                throw BlockError(.unsupported, "Server does not support export lists (old-style handshake)", path: uri.text,
                                 operation: "nbd list")
            }
            let flags = NBD.HandshakeFlags(rawValue: rawFlags)
            guard flags.contains(.fixedNewstyle) else {
                throw BlockError(.unsupported, "Server does not support export lists (not fixed-newstyle)", path: uri.text,
                                 operation: "nbd list")
            }
            var client: NBD.ClientFlags = [.fixedNewstyle]
            if flags.contains(.noZeroes) { client.insert(.noZeroes) }
            try send(NBDEncode.clientFlags(client) + NBDEncode.optionRequest(.structuredReply))
            let (sh, _) = try reply(to: .structuredReply)
            let structured = sh.replyType == .ack

            try send(NBDEncode.optionRequest(.list))
            var exports: [NBDExportListing] = []
            while true {
                let (h, p) = try reply(to: .list)
                if h.replyType == .ack { break }
                guard h.replyType == .server else {
                    throw BlockError(.io, "Server refused to list its exports (reply type \(h.type))", path: uri.text,
                                     operation: "nbd list")
                }
                var pr = NBDReader(p)
                guard let len = try? pr.u32(), Int(len) <= p.count - 4 else { throw failure("malformed NBD_REP_SERVER") }
                let name = String(decoding: p[4..<4 + Int(len)], as: UTF8.self)
                let description = String(decoding: p[(4 + Int(len))...], as: UTF8.self)
                exports.append(NBDExportListing(name: name, description: description, info: nil, hasBlockSizes: false,
                                                metaContexts: []))
            }
            for i in exports.indices {
                try describe(&exports[i], structured: structured)
            }
            // A courtesy: the server may answer or just close.
            try? send(NBDEncode.optionRequest(.abort))
            return exports
        }

        /// NBD_OPT_INFO and NBD_OPT_LIST_META_CONTEXT for one export.
        func describe(_ e: inout NBDExportListing, structured: Bool) throws {
            let req = NBDInfoRequest(exportName: e.name, requests: [NBD.Info.blockSize.rawValue])
            try send(NBDEncode.optionRequest(.info, payload: req.encode()))
            var info: NBDExportInfo?
            while true {
                let (h, p) = try reply(to: .info)
                if h.replyType == .ack { break }
                if h.isError { info = nil; break }
                guard h.replyType == .info else { throw failure("unexpected reply type \(h.type) to NBD_OPT_INFO") }
                var r = NBDReader(p)
                guard let type = try? r.u16() else { throw failure("empty NBD_REP_INFO") }
                switch NBD.Info(rawValue: type) {
                case .export:
                    guard p.count == 12, let size = try? r.u64(), let flags = try? r.u16() else {
                        throw failure("malformed NBD_INFO_EXPORT")
                    }
                    let keep = info
                    info = NBDExportInfo(exportName: e.name, size: size, flags: NBD.TransmissionFlags(rawValue: flags))
                    if let keep, e.hasBlockSizes {
                        info?.minimumBlockSize = keep.minimumBlockSize
                        info?.preferredBlockSize = keep.preferredBlockSize
                        info?.maximumBlockSize = keep.maximumBlockSize
                    }
                case .blockSize:
                    guard p.count == 14, let mn = try? r.u32(), let pref = try? r.u32(), let mx = try? r.u32() else {
                        throw failure("malformed NBD_INFO_BLOCK_SIZE")
                    }
                    if info == nil { info = NBDExportInfo(exportName: e.name, size: 0, flags: []) }
                    info?.minimumBlockSize = mn
                    info?.preferredBlockSize = pref
                    info?.maximumBlockSize = mx
                    e.hasBlockSizes = true
                case .description:
                    info?.exportDescription = String(decoding: p[2...], as: UTF8.self)
                case .name, .none:
                    break
                }
            }
            e.info = info
            guard structured else { return }
            let q = NBDMetaContextRequest(exportName: e.name, queries: [])
            try send(NBDEncode.optionRequest(.listMetaContext, payload: q.encode()))
            while true {
                let (h, p) = try reply(to: .listMetaContext)
                if h.replyType == .ack || h.isError { break }
                guard h.replyType == .metaContext, p.count >= 4 else { throw failure("malformed NBD_REP_META_CONTEXT") }
                e.metaContexts.append(String(decoding: p[4...], as: UTF8.self))
            }
        }
    }
}
