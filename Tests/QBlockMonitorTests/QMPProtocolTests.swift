import Foundation
import Testing
import QBlock
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
import TestSupport

/// The monitor without sockets: JSON, the streamer, the dispatcher, and the commands
/// called in process.
struct QMPProtocolTests {
    @Test func compactEncodingMatchesQemu() throws {
        // qemu-storage-daemon 7.2's greeting, byte for byte (built in QAPI member order).
        let version = QObject.Dict([("major", .int(7)), ("minor", .int(2)), ("micro", .int(22))])
        let g = QObject.Dict([("QMP", .dict(QObject.Dict([
            ("version", .dict(QObject.Dict([("qemu", .dict(version)), ("package", .string("Debian 1:7.2+dfsg-7+deb12u18+b3"))]))),
            ("capabilities", .list([.string("oob")])),
        ])))])
        #expect(QObject.dict(g).compactJSON
                == #"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7+deb12u18+b3"}, "capabilities": ["oob"]}}"#)
        #expect(QMPMonitor.reply(error: QMPError(.commandNotFound, "The command nope has not been found"), id: .string("x")).compactJSON
                == #"{"id": "x", "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}"#)
        #expect(QObject.list([.null, .double(1.5), .bool(true), .dict(QObject.Dict()), .list([])]).compactJSON == "[null, 1.5, true, {}, []]")
    }

    @Test(arguments: [
        (#"{"execute": }"#, "JSON parse error, expecting value"),
        (#"{"a": tru}"#, "JSON parse error, invalid keyword 'tru'"),
        (#"{"a" 1}"#, "JSON parse error, missing : in object pair"),
        (#"{"a": 1 "b": 2}"#, "JSON parse error, expected separator in dict"),
        (#"{1: 2}"#, "JSON parse error, key is not a string in object"),
        (#"[1 2]"#, "JSON parse error, expected separator in list"),
        (#""\q""#, "JSON parse error, invalid escape sequence in string"),
    ])
    func parseErrors(text: String, message: String) {
        #expect(throws: JSONParseError(message)) { try QObject.parseJSON(text) }
    }

    @Test func parsesQemuDialect() throws {
        let v = try QObject.parseJSON(#"{'a': "\ud83d\ude00\n", "b": [-5, 2.5e3, null, false], "c": {}}"#)
        #expect(v.dictValue?["a"] == .string("😀\n"))
        #expect(v.dictValue?["b"] == .list([.int(-5), .double(2500), .null, .bool(false)]))
        #expect(try QObject.parseJSON(v.compactJSON).compactJSON == v.compactJSON)
    }

    @Test func streamerCutsMessages() {
        var s = QMPStreamer(maxMessageSize: 64)
        func feed(_ text: String) -> [QMPStreamer.Output] {
            Array(text.utf8).withUnsafeBytes { s.feed($0) }
        }
        #expect(feed(#"{"execute": "a", "x": "}{"#).isEmpty)
        #expect(feed(#"\""}{"b": [1]}"#) == [.message(.dict(QObject.Dict([("execute", .string("a")), ("x", .string("}{\""))]))),
                                              .message(.dict(QObject.Dict([("b", .list([.int(1)]))])))])
        #expect(feed("5 \"s\" ]") == [.message(.int(5)), .message(.string("s")), .error("JSON parse error, expecting value")])
        #expect(feed("{\"big\": \"" + String(repeating: "x", count: 100) + "\"}{\"ignored\": 1}\n") == [.error("JSON token size limit exceeded")])
        #expect(feed("{}") == [.message(.dict(QObject.Dict()))])
        var deep = QMPStreamer()
        let nested = Array(String(repeating: "[", count: 2000).utf8).withUnsafeBytes { deep.feed($0) }
        #expect(nested == [.error("JSON nesting depth limit exceeded")])
    }

    @Test func argumentErrors() throws {
        let a = QMPArguments(QObject.Dict([("n", .string("x")), ("g", .int(1 << 40)), ("o", .dict(QObject.Dict([("p", .int(1))])))]))
        #expect(throws: QMPError.generic("Invalid parameter type for 'n', expected: integer")) { try a.optionalInt("n") }
        #expect(throws: QMPError.generic("Parameter 'g' expects uint32_t")) { try a.optionalUInt("g", bits: 32) }
        #expect(throws: QMPError.generic("Parameter 'm' is missing")) { try a.string("m") }
        let o = try a.object("o")
        #expect(throws: QMPError.generic("Parameter 'o.p' is unexpected")) { try o.done() }
        #expect(throws: QMPError.generic("Parameter 'n' does not accept value 'x'")) { try a.optionalEnum("n", ["y"]) }
    }

    @Test func dispatcherNegotiatesAndAnswers() async {
        let m = QMPMonitor()
        let s = m.openSession { _ in }
        func call(_ text: String) async -> String {
            let input: QMPStreamer.Output
            do { input = .message(try QObject.parseJSON(text)) } catch { input = .error("\(error)") }
            return await m.handle(input, session: s).compactJSON
        }
        #expect(await call(#"{"execute": "query-version"}"#)
                == #"{"error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}"#)
        #expect(await call(#"{"execute": "qmp_capabilities", "id": 7}"#) == #"{"return": {}, "id": 7}"#)
        #expect(await call(#"{"execute": "qmp_capabilities"}"#)
                == #"{"error": {"class": "CommandNotFound", "desc": "Capabilities negotiation is already complete, command ignored"}}"#)
        #expect(await call(#"{"id": 1}"#) == #"{"id": 1, "error": {"class": "GenericError", "desc": "QMP input lacks member 'execute'"}}"#)
        #expect(await call(#"{"execute": "query-version"}"#).hasPrefix(#"{"return": {"qemu": {"micro": 0, "minor": 2, "major": 7}"#))
        m.closeSession(s)
    }

    @Test func bitmapCommandsInProcess() async throws {
        let dir = TempDir("qmp-bitmaps")
        try await ImageCreator.create(format: "qcow2", path: dir.file("d.qcow2"), size: 4 << 20)
        let m = QMPMonitor()
        try await m.execute("blockdev-add", arguments: QObject.Dict([
            ("driver", .string("qcow2")), ("node-name", .string("d")),
            ("file", .dict(QObject.Dict([("driver", .string("file")), ("filename", .string(dir.file("d.qcow2")))]))),
        ]))
        func bitmap(_ cmd: String, _ pairs: [(String, QObject)]) async throws {
            try await m.execute(cmd, arguments: QObject.Dict([("node", .string("d"))] + pairs))
        }
        try await bitmap("block-dirty-bitmap-add", [("name", .string("b0"))])
        try await bitmap("block-dirty-bitmap-add", [("name", .string("b1")), ("disabled", .bool(true))])
        await #expect(throws: QMPError.generic("Bitmap already exists: b0")) { try await bitmap("block-dirty-bitmap-add", [("name", .string("b0"))]) }
        await #expect(throws: QMPError.generic("Granularity must be power of 2 and at least 512")) {
            try await bitmap("block-dirty-bitmap-add", [("name", .string("g")), ("granularity", .int(1000))])
        }
        try await bitmap("block-dirty-bitmap-add", [("name", .string("p")), ("persistent", .bool(true))])
        let node = try #require(m.graph.node(named: "d"))
        try await node.write(at: 65536, bytes: [UInt8](repeating: 1, count: 4096))
        #expect(node.bitmaps.named("b0")?.dirtyBytes == 65536)
        #expect(node.bitmaps.named("b1")?.dirtyBytes == 0)
        try await bitmap("block-dirty-bitmap-merge", [("target", .string("b1")), ("bitmaps", .list([.string("b0")]))])
        #expect(node.bitmaps.named("b1")?.dirtyBytes == 65536)
        try await bitmap("block-dirty-bitmap-clear", [("name", .string("b0"))])
        try await bitmap("block-dirty-bitmap-disable", [("name", .string("b0"))])
        try await node.write(at: 0, bytes: [UInt8](repeating: 1, count: 512))
        #expect(node.bitmaps.named("b0")?.dirtyBytes == 0)
        await #expect(throws: QMPError.generic("Dirty bitmap 'zz' not found")) { try await bitmap("block-dirty-bitmap-remove", [("name", .string("zz"))]) }
        // A transaction that fails in its last action leaves the bitmaps as they were.
        await #expect(throws: QMPError.self) {
            try await m.execute("transaction", arguments: QObject.Dict([("actions", .list([
                .dict(QObject.Dict([("type", .string("block-dirty-bitmap-add")), ("data", .dict(QObject.Dict([("node", .string("d")), ("name", .string("t"))])))])),
                .dict(QObject.Dict([("type", .string("block-dirty-bitmap-remove")), ("data", .dict(QObject.Dict([("node", .string("d")), ("name", .string("b0"))])))])),
                .dict(QObject.Dict([("type", .string("abort")), ("data", .dict(QObject.Dict()))])),
            ]))]))
        }
        #expect(node.bitmaps.all.map(\.name) == ["b0", "b1"])
        let info = try await m.execute("query-named-block-nodes")
        let bitmaps = info.listValue?.first?.dictValue?["dirty-bitmaps"]?.listValue ?? []
        // Newest first, as QEMU lists them.
        #expect(bitmaps.map { $0.dictValue?["name"]?.stringValue ?? "" } == ["p", "b1", "b0"])
        #expect(bitmaps.last?.compactJSON == #"{"name": "b0", "recording": false, "persistent": false, "busy": false, "granularity": 65536, "count": 0}"#)
        try await bitmap("block-dirty-bitmap-remove", [("name", .string("b0"))])
        try await m.execute("blockdev-del", arguments: QObject.Dict([("node-name", .string("d"))]))
        #expect(m.graph.nodes.isEmpty)
        // The persistent bitmap is in the image, with the write it recorded.
        if Tools.qemuAvailable {
            let r = try run("qemu-img", ["info", "--output=json", dir.file("d.qcow2")])
            #expect(r.stdout.contains("\"name\": \"p\""), "\(r)")
            #expect(try run("qemu-img", ["check", dir.file("d.qcow2")]).status == 0)
        }
    }

    @Test func eventsReachSubscribersWithTimestamps() async throws {
        let m = QMPMonitor()
        let received = LockedValue<[String]>([])
        let s1 = m.openSession { e in received.withLock { $0.append(e.dictValue?["event"]?.stringValue ?? "?") } }
        let stream = m.subscribe()
        m.emit(event: "EARLY")              // s1 has not negotiated: not sent to it
        s1.negotiated = true
        m.emit(event: "JOB_STATUS_CHANGE", data: QObject.Dict([("id", .string("j")), ("status", .string("running"))]))
        var it = stream.makeAsyncIterator()
        let first = await it.next(), second = await it.next()
        #expect(first?.dictValue?["event"] == .string("EARLY"))
        let e = try #require(second?.dictValue)
        #expect(e["event"] == .string("JOB_STATUS_CHANGE"))
        #expect(e["data"]?.compactJSON == #"{"status": "running", "id": "j"}"# || e["data"]?.dictValue?["id"] == .string("j"))
        let ts = try #require(e["timestamp"]?.dictValue)
        #expect((ts["seconds"]?.intValue ?? 0) > 1_700_000_000)
        #expect((0..<1_000_000).contains(ts["microseconds"]?.intValue ?? -1))
        #expect(received.current == ["JOB_STATUS_CHANGE"])
        m.closeSession(s1)
    }
}
