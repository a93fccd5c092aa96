import Foundation
import Testing
import QBlock
@testable import QBlockCore
@testable import QBlockGraph
@testable import QBlockDrivers
@testable import QBlockOpen
@testable import QBlockNBDServer
@testable import QBlockMonitor
import TestSupport

/// Protocol drivers come from one registry (``ProtocolRegistry``): the opener picks one by
/// file name, `blockdev-add` by `driver`, and the monitor turns a backing file's name into
/// that driver's `blockdev-add` options.
struct QMPBlockdevProtocolTests {
    @Test func registryChoosesByNameAndByFileName() {
        #expect(ProtocolRegistry.names == ["file", "nbd", "null-co", "null-aio"])
        #expect(ProtocolRegistry.driver(forFilename: "null-co://").name == "null-co")
        #expect(ProtocolRegistry.prefixedDriver(forFilename: "blkdebug::/x")?.name == "blkdebug")
        #expect(ProtocolRegistry.prefixedDriver(forFilename: "blkverify:/a:/b")?.name == "blkverify")
        #expect(ProtocolRegistry.prefixedDriver(forFilename: "/blkdebug:x") == nil)
        #expect(ProtocolRegistry.driver(named: "nbd").map { ObjectIdentifier($0) } == ObjectIdentifier(NBDProtocol.self))
        #expect(ProtocolRegistry.driver(named: "qcow2") == nil)
        #expect(ProtocolRegistry.driver(forFilename: "/tmp/a.qcow2").name == "file")
        #expect(ProtocolRegistry.driver(forFilename: "a.qcow2").name == "file")
        #expect(ProtocolRegistry.driver(forFilename: "nbd://localhost/x").name == "nbd")
        #expect(ProtocolRegistry.driver(forFilename: "NBD+UNIX:///x?socket=/s").name == "nbd")
        #expect(ProtocolRegistry.driver(forFilename: "nbds://h/x").name == "nbd")
        // A scheme nobody claims is a host path (which then does not exist), as in QEMU.
        #expect(ProtocolRegistry.driver(forFilename: "http://h/x").name == "file")
        // blockdev-add knows every registered protocol and format.
        for name in ProtocolRegistry.names + FormatRegistry.names {
            #expect(QMPBlockdevDrivers.names.contains(name))
            #expect(QMPBlockdevDrivers.opener(name) != nil)
        }
    }

    @Test func blockdevOptionsForFileNames() throws {
        func options(_ filename: String) throws -> QObject { .dict(try ProtocolRegistry.blockdevOptions(forFilename: filename)) }
        func json(_ text: String) throws -> QObject { try QObject.parseJSON(text) }
        #expect(try options("/d/a.qcow2") == json(#"{"driver": "file", "filename": "/d/a.qcow2"}"#))
        #expect(try options("nbd+unix:///ex%20p?socket=/s.sock")
                == json(#"{"driver": "nbd", "server": {"type": "unix", "path": "/s.sock"}, "export": "ex p"}"#))
        #expect(try options("nbd://[::1]:10810")
                == json(#"{"driver": "nbd", "server": {"type": "inet", "host": "::1", "port": "10810"}, "export": ""}"#))
        #expect(throws: BlockError.self) { try ProtocolRegistry.blockdevOptions(forFilename: "nbd+unix:///x") }
        #expect(try options("blkdebug:/c.conf:/d/a.qcow2")
                == json(#"{"driver": "blkdebug", "config": "/c.conf", "image": {"driver": "file", "filename": "/d/a.qcow2"}}"#))
        #expect(try options("blkdebug::nbd://h:1/x")
                == json(#"{"driver": "blkdebug", "image": {"driver": "nbd", "server": {"type": "inet", "host": "h", "port": "1"}, "export": "x"}}"#))
        #expect(try options("null-aio://") == json(#"{"driver": "null-aio"}"#))
        // What blockdev-add builds back from those options is the URI it came from.
        #expect(NBDURI.text(.unix(path: "/s.sock"), exportName: "ex p") == "nbd+unix:///ex%20p?socket=/s.sock")
        #expect(NBDURI.text(.tcp(host: "::1", port: 10810), exportName: "") == "nbd://[::1]:10810/")
    }

    /// A qcow2 image whose backing file is an NBD URI opens with `blockdev-add` (QEMU opens
    /// it through its nbd driver; before the registry the name was looked up as a node name).
    @Test func nbdBackingFileOpensThroughItsProtocol() async throws {
        let dir = TempDir("qmp-nbd-backing")
        let base = dir.file("base.raw")
        try writeFile(base, at: 0, [UInt8](repeating: 0x5a, count: 1 << 20))
        let f = try FileNode(path: base, readOnly: true)
        let sock = dir.file("n.sock")
        let server = NBDServer(exports: [try NBDExport(node: f, options: .init(readOnly: true))],
                               options: .init(maxClients: 8, persistent: true))
        try server.listen(unix: sock)
        try server.start()
        let running = Task { try await server.run() }
        let uri = "nbd+unix:///?socket=\(sock)"
        for (name, backingFormat) in [("a.qcow2", "raw"), ("b.qcow2", nil)] {
            let top = dir.file(name)
            try await ImageCreator.create(format: "qcow2", path: top, size: 1 << 20, backingFile: uri, backingFormat: "raw")
            if backingFormat == nil {
                // No backing format recorded: the monitor probes the export through its protocol.
                let node = try await ImageOpener.open(top, options: OpenOptions(readOnly: false, openBacking: false))
                try await #require(node as? any BackingLinked).setBackingFile(uri, format: nil)
                try await node.close()
            }
            let m = QMPMonitor()
            try await m.execute("blockdev-add", arguments: QObject.Dict([
                ("driver", .string("qcow2")), ("node-name", .string("t")),
                ("file", .dict(QObject.Dict([("driver", .string("file")), ("filename", .string(top))]))),
            ]))
            let node = try #require(m.graph.node(named: "t"))
            #expect(try await node.read(at: 4096, count: 512).allSatisfy { $0 == 0x5a })
            let backing = try #require(node.driver.backing as? BlockNode)
            #expect(backing.driverName == "raw")
            #expect(backing.driver.file?.driverName == "nbd")
            try await m.execute("blockdev-del", arguments: QObject.Dict([("node-name", .string("t"))]))
        }
        await server.shutdown()
        try await running.value
        try await f.close()
    }

    /// blkdebug, blkverify and null-co through `blockdev-add`, with their QAPI members.
    @Test func testDriversThroughBlockdevAdd() async throws {
        let dir = TempDir("qmp-test-drivers")
        let image = dir.file("a.qcow2")
        try await ImageCreator.create(format: "qcow2", path: image, size: 1 << 20)
        let m = QMPMonitor()
        try await m.execute("blockdev-add", arguments: try QObject.parseJSON(#"""
            {"driver": "qcow2", "node-name": "q", "file": {"driver": "blkdebug", "node-name": "dbg",
             "image": {"driver": "file", "filename": "\#(image)"},
             "inject-error": [{"event": "write_aio", "errno": 28, "once": true}],
             "set-state": [{"event": "write_aio", "state": 1, "new_state": 3}]}}
            """#).dictValue!)
        let q = try #require(m.graph.node(named: "q"))
        do {
            try await q.write(at: 0, bytes: [1])
            Issue.record("the injected error did not fail the write")
        } catch let e as BlockError {
            #expect(e.errno == ENOSPC)
        }
        try await q.write(at: 0, bytes: [2])
        #expect(try await q.read(at: 0, count: 1) == [2])
        let dbg = try #require(m.graph.node(named: "dbg")?.driver as? BlkdebugNode)
        #expect(dbg.currentState == 3)
        try await m.execute("blockdev-del", arguments: QObject.Dict([("node-name", .string("q"))]))

        try await m.execute("blockdev-add", arguments: try QObject.parseJSON(#"""
            {"driver": "null-co", "node-name": "n", "size": 65536, "read-zeroes": true}
            """#).dictValue!)
        let n = try #require(m.graph.node(named: "n"))
        #expect(n.length == 65536)
        #expect(try await n.read(at: 0, count: 4) == [0, 0, 0, 0])

        try await m.execute("blockdev-add", arguments: try QObject.parseJSON(#"""
            {"driver": "blkverify", "node-name": "v", "raw": {"driver": "null-co", "size": 65536, "read-zeroes": true},
             "test": {"driver": "raw", "file": {"driver": "null-co", "size": 65536, "read-zeroes": true}}}
            """#).dictValue!)
        let v = try #require(m.graph.node(named: "v"))
        #expect(try await v.read(at: 0, count: 512) == [UInt8](repeating: 0, count: 512))
        do {
            try await m.execute("blockdev-add", arguments: try QObject.parseJSON(#"""
                {"driver": "blkdebug", "node-name": "bad", "image": "n", "inject-error": [{"event": "nope"}]}
                """#).dictValue!)
            Issue.record("an unknown event was accepted")
        } catch {}
    }
}
