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

/// The client handshake state machine and the client-side codec, without sockets.
@Suite struct NBDClientHandshakeTests {
    // MARK: Helpers: a scripted server

    static func greeting(_ flags: NBD.HandshakeFlags = [.fixedNewstyle, .noZeroes]) -> [UInt8] {
        NBDEncode.greeting(flags)
    }

    static func reply(_ option: NBD.Option, _ type: NBD.OptionReply, _ payload: [UInt8] = []) -> [UInt8] {
        NBDEncode.optionReply(option: option.rawValue, type: type, payload: payload)
    }

    static func infoExport(size: UInt64, flags: NBD.TransmissionFlags) -> [UInt8] {
        var w = NBDWriter()
        w.u16(NBD.Info.export.rawValue)
        w.u64(size)
        w.u16(flags.rawValue)
        return w.bytes
    }

    static func infoBlockSize(_ mn: UInt32, _ pref: UInt32, _ mx: UInt32) -> [UInt8] {
        var w = NBDWriter()
        w.u16(NBD.Info.blockSize.rawValue)
        w.u32(mn)
        w.u32(pref)
        w.u32(mx)
        return w.bytes
    }

    static func metaContext(_ id: UInt32, _ name: String) -> [UInt8] {
        var w = NBDWriter()
        w.u32(id)
        w.string(name)
        return w.bytes
    }

    /// Feeds `stream` (the server's bytes) to the machine, handing it exactly as many bytes
    /// as each action asks for. Returns the final action and everything the client sent.
    static func drive(_ hs: inout NBDClientHandshake, _ stream: [UInt8]) -> (NBDClientHandshake.Action, [UInt8]) {
        var sent: [UInt8] = []
        var pos = 0
        var action = hs.start()
        while true {
            switch action {
            case .exchange(let send, let n):
                sent += send
                guard pos + n <= stream.count else { return (action, sent) }
                let chunk = Array(stream[pos..<(pos + n)])
                pos += n
                action = hs.receive(chunk)
            case .done(let send, _):
                sent += send
                return (action, sent)
            case .failed:
                return (action, sent)
            }
        }
    }

    static func expectDone(_ a: NBDClientHandshake.Action) -> NBDExportInfo? {
        if case .done(_, let info) = a { return info }
        Issue.record("expected the handshake to finish, got \(a)")
        return nil
    }

    static func expectFailed(_ a: NBDClientHandshake.Action) -> BlockError? {
        if case .failed(let e) = a { return e }
        Issue.record("expected the handshake to fail, got \(a)")
        return nil
    }

    // MARK: Happy paths

    @Test func fullNegotiation() throws {
        var hs = NBDClientHandshake(exportName: "disk")
        let flags: NBD.TransmissionFlags = [.hasFlags, .sendFlush, .sendFUA, .sendTrim, .sendWriteZeroes, .sendFastZero]
        var server = Self.greeting()
        server += Self.reply(.structuredReply, .ack)
        server += Self.reply(.setMetaContext, .metaContext, Self.metaContext(7, NBD.contextBaseAllocation))
        server += Self.reply(.setMetaContext, .metaContext, Self.metaContext(9, NBD.contextAllocationDepth))
        server += Self.reply(.setMetaContext, .ack)
        server += Self.reply(.go, .info, Self.infoExport(size: 1 << 30, flags: flags))
        server += Self.reply(.go, .info, Self.infoBlockSize(512, 4096, 1 << 20))
        server += Self.reply(.go, .ack)
        let (action, sent) = Self.drive(&hs, server)
        let info = try #require(Self.expectDone(action))
        #expect(info.size == 1 << 30)
        #expect(info.flags == flags)
        #expect(info.structuredReplies)
        #expect(info.baseAllocationID == 7)
        #expect(info.allocationDepthID == 9)
        #expect(info.minimumBlockSize == 512)
        #expect(info.preferredBlockSize == 4096)
        #expect(info.maximumBlockSize == 1 << 20)
        #expect(!info.usedExportName)

        // What the client sent: its flags, then the three options in order.
        var expected = NBDEncode.clientFlags([.fixedNewstyle, .noZeroes])
        expected += NBDEncode.optionRequest(.structuredReply)
        expected += NBDEncode.optionRequest(.setMetaContext, payload: NBDMetaContextRequest(
            exportName: "disk", queries: [NBD.contextBaseAllocation, NBD.contextAllocationDepth]).encode())
        expected += NBDEncode.optionRequest(.go, payload: NBDInfoRequest(
            exportName: "disk", requests: [NBD.Info.blockSize.rawValue]).encode())
        #expect(sent == expected)
    }

    @Test func noStructuredRepliesMeansNoMetaContexts() throws {
        var hs = NBDClientHandshake(exportName: "")
        var server = Self.greeting()
        server += Self.reply(.structuredReply, .errUnsupported)
        server += Self.reply(.go, .info, Self.infoExport(size: 4096, flags: [.hasFlags, .readOnly]))
        server += Self.reply(.go, .ack)
        let (action, sent) = Self.drive(&hs, server)
        let info = try #require(Self.expectDone(action))
        #expect(!info.structuredReplies)
        #expect(info.metaContexts.isEmpty)
        #expect(info.flags.contains(.readOnly))
        // Without NBD_INFO_BLOCK_SIZE: the protocol's defaults, capped by the export size.
        #expect(info.minimumBlockSize == 1)
        #expect(info.maximumBlockSize == 4096)
        // No SET_META_CONTEXT was sent.
        let setMeta = NBDEncode.optionRequest(.setMetaContext, payload: [])
        #expect(!sent.indices.contains { sent[$0...].starts(with: setMeta.prefix(12)) })
    }

    @Test func goUnsupportedFallsBackToExportName() throws {
        var hs = NBDClientHandshake(exportName: "old")
        var server = Self.greeting()
        server += Self.reply(.structuredReply, .errUnsupported)
        server += Self.reply(.go, .errUnsupported)
        var w = NBDWriter()
        w.u64(1 << 20)
        w.u16(NBD.TransmissionFlags([.hasFlags, .sendFlush]).rawValue)
        server += w.bytes  // NO_ZEROES negotiated: no 124 zero bytes
        let (action, sent) = Self.drive(&hs, server)
        let info = try #require(Self.expectDone(action))
        #expect(info.usedExportName)
        #expect(info.size == 1 << 20)
        #expect(sent.suffix(3 + 16) == ArraySlice(NBDEncode.optionRequest(.exportName, payload: Array("old".utf8))))
    }

    @Test func plainNewstyleServerGetsExportNameWithZeroes() throws {
        var hs = NBDClientHandshake(exportName: "x")
        var server = Self.greeting([])
        var w = NBDWriter()
        w.u64(512)
        w.u16(NBD.TransmissionFlags.hasFlags.rawValue)
        server += w.bytes + [UInt8](repeating: 0, count: 124)
        let (action, sent) = Self.drive(&hs, server)
        let info = try #require(Self.expectDone(action))
        #expect(info.size == 512)
        #expect(Array(sent.prefix(4)) == NBDEncode.clientFlags([]))
    }

    // MARK: Errors

    @Test func unknownExportIsNotFound() throws {
        var hs = NBDClientHandshake(exportName: "nope")
        var server = Self.greeting()
        server += Self.reply(.structuredReply, .ack)
        server += Self.reply(.setMetaContext, .ack)
        server += Self.reply(.go, .errUnknown, Array("export 'nope' not present".utf8))
        let (action, _) = Self.drive(&hs, server)
        let e = try #require(Self.expectFailed(action))
        #expect(e.code == .notFound)
        #expect(e.message.hasPrefix("Requested export not available"))
        #expect(e.message.contains("export 'nope' not present"))
    }

    @Test(arguments: [NBD.OptionReply.errPolicy, .errTLSRequired, .errShutdown, .errInvalid, .errPlatform])
    func goErrorsFail(_ type: NBD.OptionReply) throws {
        var hs = NBDClientHandshake(exportName: "")
        var server = Self.greeting()
        server += Self.reply(.structuredReply, .errUnsupported)
        server += Self.reply(.go, type)
        let (action, _) = Self.drive(&hs, server)
        _ = Self.expectFailed(action)
    }

    /// Malformed servers: the machine fails with an error and never traps.
    static let malformed: [(String, [UInt8])] = {
        var cases: [(String, [UInt8])] = []
        cases.append(("bad init magic", [UInt8](repeating: 0x41, count: 18)))
        var old = NBDWriter()
        old.u64(NBD.initMagic)
        old.u64(NBD.oldstyleMagic)
        old.u16(0)
        cases.append(("old-style server", old.bytes))
        var badOpt = NBDWriter()
        badOpt.u64(NBD.initMagic)
        badOpt.u64(0x1234)
        badOpt.u16(1)
        cases.append(("bad option magic", badOpt.bytes))
        var badReplyMagic = greeting()
        var w = NBDWriter()
        w.u64(0xdead_beef)
        w.u32(NBD.Option.structuredReply.rawValue)
        w.u32(1)
        w.u32(0)
        badReplyMagic += w.bytes
        cases.append(("bad option reply magic", badReplyMagic))
        cases.append(("reply to another option", greeting() + reply(.go, .ack)))
        cases.append(("ack with payload", greeting() + reply(.structuredReply, .ack, [1, 2, 3])))
        var huge = greeting()
        var h = NBDWriter()
        h.u64(NBD.optionReplyMagic)
        h.u32(NBD.Option.structuredReply.rawValue)
        h.u32(NBD.OptionReply.ack.rawValue)
        h.u32(0xffff_ffff)
        huge += h.bytes
        cases.append(("huge reply", huge))
        let pre = greeting() + reply(.structuredReply, .errUnsupported)
        cases.append(("go ack without export info", pre + reply(.go, .ack)))
        cases.append(("truncated export info", pre + reply(.go, .info, Array(infoExport(size: 1, flags: []).prefix(7)))))
        cases.append(("min block not a power of two", pre + reply(.go, .info, infoBlockSize(3, 4096, 65536))))
        cases.append(("min block too big", pre + reply(.go, .info, infoBlockSize(1 << 20, 1 << 20, 1 << 20))))
        cases.append(("preferred below minimum", pre + reply(.go, .info, infoBlockSize(4096, 512, 65536))))
        cases.append(("maximum not a multiple", pre + reply(.go, .info, infoBlockSize(512, 4096, 1000))))
        cases.append(("export too large", pre + reply(.go, .info, infoExport(size: UInt64.max, flags: [.hasFlags]))))
        cases.append(("unexpected reply type", greeting() + reply(.structuredReply, .server)))
        cases.append(("unrequested meta context", greeting() + reply(.structuredReply, .ack)
                        + reply(.setMetaContext, .metaContext, metaContext(1, "qemu:dirty-bitmap:x"))))
        cases.append(("short meta context", greeting() + reply(.structuredReply, .ack)
                        + reply(.setMetaContext, .metaContext, [0, 1])))
        return cases
    }()

    @Test(arguments: malformed.map(\.0))
    func malformedServerRepliesFail(_ name: String) throws {
        let stream = try #require(Self.malformed.first { $0.0 == name }?.1)
        var hs = NBDClientHandshake(exportName: "")
        let (action, _) = Self.drive(&hs, stream)
        _ = Self.expectFailed(action)
        // The machine stays failed.
        if case .exchange = hs.receive([0, 0, 0]) { Issue.record("\(name): machine accepted input after failing") }
    }

    /// Random bytes after a valid greeting never trap the machine.
    @Test func fuzzedRepliesNeverTrap() {
        var rng = SystemRandomNumberGenerator()
        for _ in 0..<2000 {
            var hs = NBDClientHandshake(exportName: "f")
            var stream = Self.greeting()
            if Bool.random(using: &rng) { stream += Self.reply(.structuredReply, .ack) }
            var tail = NBDEncode.optionReply(option: UInt32.random(in: 6...10), type: [.ack, .info, .metaContext, .errUnknown].randomElement()!,
                                             payload: (0..<Int.random(in: 0..<20)).map { _ in UInt8.random(in: 0...255) })
            for _ in 0..<Int.random(in: 0..<4) { tail[Int.random(in: 0..<tail.count)] = UInt8.random(in: 0...255) }
            stream += tail
            _ = Self.drive(&hs, stream)
        }
    }

    // MARK: Codec

    @Test func replyHeaders() throws {
        let simple = NBDEncode.simpleReplyHeader(error: .io, cookie: 42)
        #expect(try NBDReplyHeader.totalSize(first16: simple) == 16)
        #expect(try NBDReplyHeader.decode(simple) == .simple(error: 5, cookie: 42))
        let chunk = NBDEncode.chunkHeader(flags: 1, type: .offsetData, cookie: 7, length: 100)
        #expect(try NBDReplyHeader.totalSize(first16: Array(chunk.prefix(16))) == 20)
        #expect(try NBDReplyHeader.decode(chunk) == .chunk(flags: 1, type: 1, cookie: 7, length: 100))
        #expect(throws: NBDProtocolViolation.self) { try NBDReplyHeader.decode([UInt8](repeating: 0, count: 16)) }
    }

    @Test func errorAndStatusChunks() throws {
        let err = NBDEncode.errorChunk(cookie: 1, error: .io, message: "disk on fire")
        let e = try NBDChunk.decodeError(type: NBD.ReplyType.error.rawValue, Array(err.dropFirst(20)))
        #expect(e.error == 5)
        #expect(e.message == "disk on fire")
        #expect(throws: NBDProtocolViolation.self) {
            try NBDChunk.decodeError(type: NBD.ReplyType.error.rawValue, [0, 0, 0, 5, 0, 9, 1])
        }
        let bs = NBDEncode.blockStatusChunk(cookie: 1, contextID: 3, extents: [(4096, 3), (512, 0)], done: true)
        let (id, ext) = try NBDChunk.decodeBlockStatus(Array(bs.dropFirst(20)))
        #expect(id == 3)
        #expect(ext.map(\.length) == [4096, 512])
        #expect(ext.map(\.flags) == [3, 0])
        #expect(throws: NBDProtocolViolation.self) { try NBDChunk.decodeBlockStatus([0, 0, 0, 1, 0, 0]) }
        #expect(try NBDChunk.position(offset: 1024, count: 512, reqOffset: 0, reqLength: 4096) == 1024)
        #expect(throws: NBDProtocolViolation.self) { try NBDChunk.position(offset: 4000, count: 512, reqOffset: 0, reqLength: 4096) }
        #expect(throws: NBDProtocolViolation.self) { try NBDChunk.position(offset: 0, count: 1, reqOffset: 512, reqLength: 4096) }
    }
}

/// Parsing of NBD URIs.
@Suite struct NBDClientURITests {
    @Test(arguments: [
        ("nbd://example.com/disk", NBDURI.Transport.tcp(host: "example.com", port: 10809), "disk", "nbd://example.com:10809/disk"),
        ("nbd://127.0.0.1:1234", .tcp(host: "127.0.0.1", port: 1234), "", "nbd://127.0.0.1:1234"),
        ("nbd://127.0.0.1:1234/", .tcp(host: "127.0.0.1", port: 1234), "", "nbd://127.0.0.1:1234"),
        ("nbd+tcp://[::1]:99/a%20b", .tcp(host: "::1", port: 99), "a b", "nbd+tcp://[::1]:99/a%20b"),
        ("nbd+unix:///?socket=/tmp/s", .unix(path: "/tmp/s"), "", "nbd+unix://?socket=/tmp/s"),
        ("nbd+unix://?socket=/tmp/s", .unix(path: "/tmp/s"), "", "nbd+unix://?socket=/tmp/s"),
        ("nbd+unix:///exp/sub?socket=/run/x%2By.sock", .unix(path: "/run/x+y.sock"), "exp/sub", "nbd+unix:///exp/sub?socket=/run/x+y.sock"),
    ])
    func parses(_ text: String, _ transport: NBDURI.Transport, _ export: String, _ canonical: String) throws {
        let u = try NBDURI(text)
        #expect(u.transport == transport)
        #expect(u.exportName == export)
        #expect(u.canonicalFilename == canonical)
        #expect(NBDURI.isNBDURI(text))
    }

    @Test(arguments: ["nbd+unix:///x", "nbd+unix://host/x?socket=/s", "nbd://h:0/x", "nbd://h:99999/", "nbd://h/x?socket=/s",
                      "nbd://h/%zz", "nbds://h/x", "nbd+unix:///?socket=/s&foo=1"])
    func rejects(_ text: String) {
        #expect(throws: BlockError.self) { try NBDURI(text) }
    }

    /// QEMU's legacy `nbd:` file names (iotests 058 opens `nbd:unix:PATH`).
    @Test(arguments: [
        ("nbd:unix:/tmp/s", NBDURI.Transport.unix(path: "/tmp/s"), "", "nbd+unix://?socket=/tmp/s"),
        ("nbd:unix:/tmp/s:exportname=exp", .unix(path: "/tmp/s"), "exp", "nbd+unix:///exp?socket=/tmp/s"),
        ("nbd:localhost:10810", .tcp(host: "localhost", port: 10810), "", "nbd://localhost:10810"),
        ("nbd:127.0.0.1:99:exportname=a", .tcp(host: "127.0.0.1", port: 99), "a", "nbd://127.0.0.1:99/a"),
        ("nbd:[::1]:99", .tcp(host: "::1", port: 99), "", "nbd:[::1]:99"),
    ])
    func parsesLegacy(_ text: String, _ transport: NBDURI.Transport, _ export: String, _ canonical: String) throws {
        let u = try NBDURI(text)
        #expect(u.transport == transport)
        #expect(u.exportName == export)
        #expect(u.canonicalFilename == canonical)
        #expect(NBDProtocol.claimsLegacyFilename(text))
        #expect(ProtocolRegistry.driver(forFilename: text).name == NBDProtocol.name)
    }

    @Test(arguments: ["nbd:unix:", "nbd:host", "nbd:host:notaport", "nbd::99"])
    func rejectsLegacy(_ text: String) {
        #expect(throws: BlockError.self) { try NBDURI(text) }
    }

    @Test func notURIs() {
        #expect(!NBDURI.isNBDURI("/tmp/nbd://x"))
        #expect(!NBDURI.isNBDURI("image.qcow2"))
        #expect(!NBDURI.isNBDURI("http://x/y"))
    }
}
