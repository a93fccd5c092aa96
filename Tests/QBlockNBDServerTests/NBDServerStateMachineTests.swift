import Testing
import QBlock
import TestSupport
@testable import QBlockCore
@testable import QBlockNBDWire
@testable import QBlockBitmaps
@testable import QBlockGraph
@testable import QBlockDrivers
@testable import QBlockOpen
@testable import QBlockOperations
@testable import QBlockJobs
@testable import QBlockNBDServer
@testable import QBlockMonitor

/// The handshake and transmission state machines, without sockets or disks.
@Suite struct NBDServerHandshakeTests {
    static let rw = NBDExportDescriptor(name: "disk", description: "a disk", size: 1 << 20,
                                  flags: [.hasFlags, .sendFlush, .sendFUA, .sendCache, .sendTrim, .sendWriteZeroes, .sendFastZero],
                                  allocationDepth: true)
    static let ro = NBDExportDescriptor(name: "", size: 4096, flags: [.hasFlags, .readOnly, .sendFlush, .sendFUA, .sendCache])

    /// A machine past the client flags.
    func started(_ flags: NBD.ClientFlags = [.fixedNewstyle, .noZeroes]) -> NBDServerHandshake {
        var hs = NBDServerHandshake(exports: [Self.rw, Self.ro])
        var w = NBDWriter()
        w.u32(flags.rawValue)
        #expect(hs.receive(w.bytes).isEmpty)
        return hs
    }

    /// Feeds one option (header and payload) and returns the actions.
    func option(_ hs: inout NBDServerHandshake, _ option: UInt32, _ payload: [UInt8] = []) -> [NBDServerHandshake.Action] {
        var w = NBDWriter()
        w.u64(NBD.optionMagic)
        w.u32(option)
        w.u32(UInt32(payload.count))
        #expect(hs.bytesWanted == 16)
        var actions = hs.receive(w.bytes)
        if !payload.isEmpty {
            #expect(actions.isEmpty)
            #expect(hs.bytesWanted == payload.count)
            actions = hs.receive(payload)
        }
        return actions
    }

    /// The (option, type, payload) of each reply sent.
    func replies(_ actions: [NBDServerHandshake.Action]) -> [(UInt32, UInt32, [UInt8])] {
        actions.compactMap { a in
            guard case .send(let b) = a else { return nil }
            var r = NBDReader(b)
            guard (try? r.u64()) == NBD.optionReplyMagic, let o = try? r.u32(), let t = try? r.u32(),
                  let n = try? r.u32(), let p = try? r.take(Int(n)) else { return nil }
            return (o, t, p)
        }
    }

    @Test func greetingIsFixedNewstyleWithNoZeroes() {
        let hs = NBDServerHandshake(exports: [])
        #expect(hs.greeting == NBDEncode.greeting([.fixedNewstyle, .noZeroes]))
        #expect(hs.greeting.count == 18)
        #expect(hs.bytesWanted == 4)
    }

    @Test func unknownClientFlagsClose() {
        var hs = NBDServerHandshake(exports: [])
        #expect(hs.receive([0, 0, 0, 4]) == [.close])
        #expect(hs.isFinished)
    }

    @Test func badOptionMagicCloses() {
        var hs = started()
        #expect(hs.receive([UInt8](repeating: 0x41, count: 16)) == [.close])
    }

    @Test func hugeOptionIsTooBigAndCloses() {
        var hs = started()
        var w = NBDWriter()
        w.u64(NBD.optionMagic)
        w.u32(NBD.Option.go.rawValue)
        w.u32(0xffff_ffff)
        let a = hs.receive(w.bytes)
        #expect(a.last == .close)
        #expect(replies(a).map(\.1) == [NBD.OptionReply.errTooBig.rawValue])
    }

    @Test func listSendsEachExportThenAck() {
        var hs = started()
        let r = replies(option(&hs, NBD.Option.list.rawValue))
        #expect(r.map(\.1) == [NBD.OptionReply.server.rawValue, NBD.OptionReply.server.rawValue, NBD.OptionReply.ack.rawValue])
        var first = NBDReader(r[0].2)
        #expect((try? first.lengthPrefixedString()) == "disk")
        #expect(String(decoding: (try? first.take(first.remaining)) ?? [], as: UTF8.self) == "a disk")
        // LIST with a payload is invalid.
        #expect(replies(option(&hs, NBD.Option.list.rawValue, [1])).map(\.1) == [NBD.OptionReply.errInvalid.rawValue])
    }

    @Test func goUnknownExportThenKnown() {
        var hs = started()
        let unknown = NBDInfoRequest(exportName: "nope", requests: []).encode()
        #expect(replies(option(&hs, NBD.Option.go.rawValue, unknown)).map(\.1) == [NBD.OptionReply.errUnknown.rawValue])
        #expect(replies(option(&hs, NBD.Option.info.rawValue, [0, 0, 0, 9])).map(\.1) == [NBD.OptionReply.errInvalid.rawValue])
        #expect(option(&hs, NBD.Option.structuredReply.rawValue) .count == 1)
        let a = option(&hs, NBD.Option.go.rawValue, NBDInfoRequest(exportName: "disk", requests: [NBD.Info.name.rawValue]).encode())
        let r = replies(a)
        let infos = r.filter { $0.1 == NBD.OptionReply.info.rawValue }.map { Array($0.2) }
        #expect(infos.map { UInt16($0[0]) << 8 | UInt16($0[1]) } == [1, 2, 3, 0])  // name, description, block size, export
        #expect(infos[2] == [0, 3, 0, 0, 0, 1, 0, 0, 0x10, 0, 0x02, 0, 0, 0])        // min 1, preferred 4096, max 32 MiB
        var e = NBDReader(infos[3])
        _ = try? e.u16()
        #expect((try? e.u64()) == 1 << 20)
        let flags = NBD.TransmissionFlags(rawValue: (try? e.u16()) ?? 0)
        #expect(flags.contains(.sendDF))
        #expect(r.last?.1 == NBD.OptionReply.ack.rawValue)
        guard case .transmit(let n)? = a.last else {
            Issue.record("no transmission")
            return
        }
        #expect(n.export.name == "disk" && n.structuredReplies && n.contexts.isEmpty)
        #expect(hs.isFinished)
    }

    @Test func metaContextsNeedStructuredReplies() {
        var hs = started()
        let q = NBDMetaContextRequest(exportName: "disk", queries: ["base:allocation"]).encode()
        #expect(replies(option(&hs, NBD.Option.setMetaContext.rawValue, q)).map(\.1) == [NBD.OptionReply.errInvalid.rawValue])
        #expect(replies(option(&hs, NBD.Option.structuredReply.rawValue)).map(\.1) == [NBD.OptionReply.ack.rawValue])
        #expect(replies(option(&hs, NBD.Option.structuredReply.rawValue)).map(\.1) == [NBD.OptionReply.errInvalid.rawValue])
    }

    @Test(arguments: [
        (["base:"], ["base:allocation"]),
        (["qemu:"], ["qemu:allocation-depth"]),
        ([], ["base:allocation", "qemu:allocation-depth"]),
        (["qemu:allocation-depth", "base:allocation", "base:allocation"], ["base:allocation", "qemu:allocation-depth"]),
        (["qemu:dirty-bitmap:b0", "other:x"], []),
    ])
    func listMetaContext(queries: [String], expected: [String]) {
        var hs = started()
        _ = option(&hs, NBD.Option.structuredReply.rawValue)
        let r = replies(option(&hs, NBD.Option.listMetaContext.rawValue,
                               NBDMetaContextRequest(exportName: "disk", queries: queries).encode()))
        #expect(r.last?.1 == NBD.OptionReply.ack.rawValue)
        #expect(r.dropLast().map { String(decoding: $0.2.dropFirst(4), as: UTF8.self) } == expected)
    }

    @Test func setMetaContextAppliesToItsExportOnly() {
        var hs = started()
        _ = option(&hs, NBD.Option.structuredReply.rawValue)
        // "base:" alone selects nothing with SET; the export without -A has no depth context.
        let none = replies(option(&hs, NBD.Option.setMetaContext.rawValue,
                                  NBDMetaContextRequest(exportName: "", queries: ["base:", "qemu:allocation-depth"]).encode()))
        #expect(none.map(\.1) == [NBD.OptionReply.ack.rawValue])
        let r = replies(option(&hs, NBD.Option.setMetaContext.rawValue,
                               NBDMetaContextRequest(exportName: "disk", queries: ["base:allocation", "qemu:allocation-depth"]).encode()))
        #expect(r.map(\.1) == [NBD.OptionReply.metaContext.rawValue, NBD.OptionReply.metaContext.rawValue, NBD.OptionReply.ack.rawValue])
        #expect(Array(r[1].2.prefix(4)) == [0, 0, 0, 1])
        var other = hs
        if case .transmit(let n)? = option(&hs, NBD.Option.go.rawValue, NBDInfoRequest(exportName: "disk", requests: []).encode()).last {
            #expect(n.contexts == [.baseAllocation, .allocationDepth])
        } else { Issue.record("no transmission") }
        if case .transmit(let n)? = option(&other, NBD.Option.go.rawValue, NBDInfoRequest(exportName: "", requests: []).encode()).last {
            #expect(n.contexts.isEmpty)
            #expect(n.flags.contains(.readOnly))
        } else { Issue.record("no transmission") }
    }

    @Test func unknownOptionsAreUnsupported() {
        var hs = started()
        #expect(replies(option(&hs, 4242, [1, 2, 3])).map(\.1) == [NBD.OptionReply.errUnsupported.rawValue])
        #expect(replies(option(&hs, NBD.Option.extendedHeaders.rawValue)).map(\.1) == [NBD.OptionReply.errUnsupported.rawValue])
        #expect(!hs.isFinished)
        let a = option(&hs, NBD.Option.abort.rawValue)
        #expect(replies(a).map(\.1) == [NBD.OptionReply.ack.rawValue])
        #expect(a.last == .close)
    }

    @Test(arguments: [true, false])
    func exportName(noZeroes: Bool) {
        var hs = started(noZeroes ? [.fixedNewstyle, .noZeroes] : [.fixedNewstyle])
        let a = option(&hs, NBD.Option.exportName.rawValue, Array("disk".utf8))
        guard case .send(let b)? = a.first, case .transmit? = a.last else {
            Issue.record("unexpected \(a)")
            return
        }
        #expect(b.count == (noZeroes ? 10 : 134))
        var unknown = started()
        #expect(option(&unknown, NBD.Option.exportName.rawValue, Array("x".utf8)) == [.close])
    }

    @Test func clientWithoutFixedNewstyleOnlyGetsExportName() {
        var hs = started([])
        #expect(option(&hs, NBD.Option.list.rawValue) == [.close])
    }
}

@Suite struct NBDServerTransmissionTests {
    func header(_ type: UInt16, flags: NBD.CommandFlags = [], offset: UInt64 = 0, length: UInt32 = 512, cookie: UInt64 = 7) -> [UInt8] {
        NBDRequest(flags: flags, type: type, cookie: cookie, offset: offset, length: length).encode()
    }

    func machine(readOnly: Bool = false, structured: Bool = true, contexts: [NBDMetaContext] = [.baseAllocation]) -> NBDTransmission {
        var flags: NBD.TransmissionFlags = [.hasFlags, .sendFlush]
        if readOnly { flags.insert(.readOnly) }
        return NBDTransmission(size: 1 << 20, flags: flags, structuredReplies: structured, contexts: contexts)
    }

    @Test func validCommandsExecute() {
        var tx = machine()
        #expect(tx.receive(header: header(0, flags: .dontFragment)) == .execute(.read(offset: 0, length: 512, dontFragment: true), cookie: 7, payload: 0))
        #expect(tx.receive(header: header(1, flags: .fua, offset: 4096)) == .execute(.write(offset: 4096, length: 512, fua: true), cookie: 7, payload: 512))
        #expect(tx.receive(header: header(6, flags: [.noHole, .fastZero])) ==
                .execute(.writeZeroes(offset: 0, length: 512, fua: false, noHole: true, fastZero: true), cookie: 7, payload: 0))
        #expect(tx.receive(header: header(7, flags: .reqOne, length: 1 << 20)) == .execute(.blockStatus(offset: 0, length: 1 << 20, reqOne: true), cookie: 7, payload: 0))
        #expect(tx.receive(header: header(3, length: 0)) == .execute(.flush, cookie: 7, payload: 0))
        #expect(tx.receive(header: header(5)) == .execute(.cache(offset: 0, length: 512), cookie: 7, payload: 0))
        #expect(tx.receive(header: header(4)) == .execute(.trim(offset: 0, length: 512, fua: false), cookie: 7, payload: 0))
        // A read of the last byte and a zero-length read at the end are in range.
        #expect(tx.receive(header: header(0, offset: (1 << 20) - 1, length: 1)) == .execute(.read(offset: (1 << 20) - 1, length: 1, dontFragment: false), cookie: 7, payload: 0))
        #expect(tx.receive(header: header(0, offset: 1 << 20, length: 0)) == .execute(.read(offset: 1 << 20, length: 0, dontFragment: false), cookie: 7, payload: 0))
        #expect(!tx.isClosed)
    }

    @Test(arguments: [
        // (type, flags, offset, length, expected error, discard, close)
        (UInt16(0), UInt16(0), UInt64(1 << 20), UInt32(1), NBD.WireError.inval, 0, false),      // read past EOF
        (0, 0, UInt64.max - 10, 512, .inval, 0, false),                                        // offset overflow
        (0, 0, 0, (32 << 20) + 1, .inval, 0, false),                                           // read too large
        (1, 0, 0, (32 << 20) + 1, .inval, 0, true),                                            // write too large: close
        (1, 0, 1 << 20, 512, .nospc, 512, false),                                              // write past EOF
        (6, 0, 1 << 20, 512, .nospc, 0, false),                                                // zero past EOF
        (99, 0, 0, 512, .inval, 0, false),                                                     // unknown command
        (0, 0x8000, 0, 512, .inval, 0, false),                                                 // unknown flag
        (3, UInt16(NBD.CommandFlags.noHole.rawValue), 0, 0, .inval, 0, false),                 // flag not for flush
        (1, UInt16(NBD.CommandFlags.reqOne.rawValue), 0, 16, .inval, 16, false),               // flag not for write
        (7, 0, 0, 0, .inval, 0, false),                                                        // block status of nothing
    ] as [(UInt16, UInt16, UInt64, UInt32, NBD.WireError, Int, Bool)])
    func rejected(type: UInt16, flags: UInt16, offset: UInt64, length: UInt32, error: NBD.WireError, discard: Int, close: Bool) {
        var tx = machine()
        guard case .reject(let cookie, let e, _, let d, let c) = tx.receive(header: header(type, flags: NBD.CommandFlags(rawValue: flags), offset: offset, length: length)) else {
            Issue.record("not rejected")
            return
        }
        #expect(cookie == 7 && e == error && d == discard && c == close)
        #expect(tx.isClosed == close)
    }

    @Test func readOnlyRefusesWritesWithEPERM() {
        var tx = machine(readOnly: true)
        for t: UInt16 in [1, 4, 6] {
            guard case .reject(_, let e, _, let d, false) = tx.receive(header: header(t)) else {
                Issue.record("type \(t) not rejected")
                continue
            }
            #expect(e == .perm)
            #expect(d == (t == 1 ? 512 : 0))
        }
        #expect(tx.receive(header: header(0)) == .execute(.read(offset: 0, length: 512, dontFragment: false), cookie: 7, payload: 0))
    }

    @Test func dontFragmentNeedsStructuredReplies() {
        var tx = machine(structured: false, contexts: [])
        guard case .reject(_, .inval, _, _, false) = tx.receive(header: header(0, flags: .dontFragment)) else {
            Issue.record("DF accepted without structured replies")
            return
        }
        guard case .reject(_, .inval, _, _, false) = tx.receive(header: header(7)) else {
            Issue.record("block status without contexts accepted")
            return
        }
    }

    @Test func badMagicAndDisconnectEndTheStream() {
        var tx = machine()
        var h = header(0)
        h[0] ^= 0xff
        #expect(tx.receive(header: h) == .close)
        #expect(tx.isClosed)
        var tx2 = machine()
        #expect(tx2.receive(header: header(2, flags: NBD.CommandFlags(rawValue: 0xffff), offset: .max, length: .max)) == .disconnect)
        #expect(tx2.receive(header: header(0)) == .close)
    }

    @Test func replies() {
        let s = machine(structured: true)
        #expect(s.errorReply(cookie: 9, error: .perm, message: "ro") == NBDEncode.errorChunk(cookie: 9, error: .perm, message: "ro"))
        #expect(s.successReply(cookie: 9) == NBDEncode.doneChunk(cookie: 9))
        let p = machine(structured: false)
        #expect(p.errorReply(cookie: 9, error: .perm, message: "ro") == NBDEncode.simpleReplyHeader(error: .perm, cookie: 9))
        let h = NBDTransmission.dataChunkHeader(cookie: 1, offset: 4096, length: 512, done: true)
        #expect(h.count == 28)
        #expect(Array(h[16..<20]) == [0, 0, 2, 8])  // length = 8 + data
    }

    @Test func readPiecesMergeAndCover() {
        let pieces = NBDTransmission.readPieces(offset: 100, length: 1000,
                                                runs: [(200, false), (100, false), (300, true), (50, true), (1000, false)])
        #expect(pieces == [.data(offset: 100, length: 300), .hole(offset: 400, length: 350), .data(offset: 750, length: 350)])
        #expect(NBDTransmission.readPieces(offset: 0, length: 10, runs: []) == [.data(offset: 0, length: 10)])
    }

    @Test func extentsMergeAndStopAtTheLimit() {
        var e: [(UInt32, UInt32)] = []
        #expect(NBDTransmission.addExtent(&e, length: 10, flags: 3, limit: 1))
        #expect(NBDTransmission.addExtent(&e, length: 5, flags: 3, limit: 1))
        #expect(!NBDTransmission.addExtent(&e, length: 5, flags: 0, limit: 1))
        #expect(e.count == 1 && e[0].0 == 15 && e[0].1 == 3)
        #expect(NBDTransmission.allocationFlags(data: false, zero: true) == 3)
        #expect(NBDTransmission.allocationFlags(data: true, zero: false) == 0)
    }
}
