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

/// `qemu:dirty-bitmap:NAME` in the handshake state machine (no sockets): LIST and SET with
/// exact names, the `qemu:` and `qemu:dirty-bitmap:` prefixes, and qemu-nbd's context ids.
@Suite struct NBDBitmapHandshakeTests {
    static let export = NBDExportDescriptor(name: "disk", size: 1 << 20, flags: [.hasFlags, .readOnly], allocationDepth: true,
                                            bitmapNames: ["b0", "b1"])

    func replies(_ queries: [String], list: Bool) -> [(UInt32, String)] {
        var hs = NBDServerHandshake(exports: [Self.export])
        var out: [(UInt32, String)] = []
        func option(_ o: NBD.Option, _ payload: [UInt8]) -> [NBDServerHandshake.Action] {
            var w = NBDWriter()
            w.u64(NBD.optionMagic)
            w.u32(o.rawValue)
            w.u32(UInt32(payload.count))
            var a = hs.receive(w.bytes)
            if !payload.isEmpty { a = hs.receive(payload) }
            return a
        }
        var w = NBDWriter()
        w.u32(NBD.ClientFlags([.fixedNewstyle, .noZeroes]).rawValue)
        _ = hs.receive(w.bytes)
        _ = option(.structuredReply, [])
        let actions = option(list ? .listMetaContext : .setMetaContext,
                             NBDMetaContextRequest(exportName: "disk", queries: queries).encode())
        for a in actions {
            guard case .send(let b) = a else { continue }
            var r = NBDReader(b)
            guard (try? r.u64()) == NBD.optionReplyMagic, (try? r.u32()) != nil, let t = try? r.u32(),
                  let n = try? r.u32(), let p = try? r.take(Int(n)), t == NBD.OptionReply.metaContext.rawValue else { continue }
            var pr = NBDReader(p)
            let id = (try? pr.u32()) ?? 999
            out.append((id, String(decoding: p.dropFirst(4), as: UTF8.self)))
        }
        return out
    }

    @Test(arguments: [
        ([], true, ["0 base:allocation", "1 qemu:allocation-depth", "2 qemu:dirty-bitmap:b0", "3 qemu:dirty-bitmap:b1"]),
        (["qemu:"], true, ["1 qemu:allocation-depth", "2 qemu:dirty-bitmap:b0", "3 qemu:dirty-bitmap:b1"]),
        (["qemu:dirty-bitmap:"], true, ["2 qemu:dirty-bitmap:b0", "3 qemu:dirty-bitmap:b1"]),
        (["qemu:dirty-bitmap:"], false, []),
        (["qemu:"], false, []),
        (["qemu:dirty-bitmap:b1"], false, ["3 qemu:dirty-bitmap:b1"]),
        (["qemu:dirty-bitmap:b1", "base:allocation", "qemu:dirty-bitmap:nope"], false, ["0 base:allocation", "3 qemu:dirty-bitmap:b1"]),
        (["qemu:dirty-bitmap:b"], true, []),
    ])
    func contexts(queries: [String], list: Bool, expected: [String]) {
        #expect(replies(queries, list: list).map { "\($0.0) \($0.1)" } == expected)
    }

    /// Extents of a bitmap as qemu-nbd's bitmap_to_extents: merged runs, 1 dirty, 0 clean,
    /// at most `limit`.
    @Test func extents() throws {
        let b = try DirtyBitmap(name: "b", size: 1 << 20, granularity: 4096)
        b.mark(offset: 8192, length: 100)
        b.mark(offset: 12288, length: 4096)
        b.mark(offset: 65536, length: 1)
        var e: [(UInt32, UInt32)] = []
        NBDConnection.bitmapExtents(b, offset: 4096, length: 1 << 19, limit: 100, into: &e)
        #expect(e.map { "\($0.0):\($0.1)" } == ["4096:0", "8192:1", "49152:0", "4096:1", "458752:0"])
        e = []
        NBDConnection.bitmapExtents(b, offset: 0, length: 1 << 20, limit: 1, into: &e)
        #expect(e.map { "\($0.0):\($0.1)" } == ["8192:0"])
        e = []
        NBDConnection.bitmapExtents(b, offset: 9000, length: 100, limit: 10, into: &e)
        #expect(e.map { "\($0.0):\($0.1)" } == ["100:1"])
    }
}

/// Our server's `qemu:dirty-bitmap:` contexts against qemu-nbd's, through nbdinfo and
/// qemu-img map with x-dirty-bitmap.
@Suite(.serialized, .enabled(if: BitmapFixtures.ready, Comment(rawValue: NBDHarness.missing)))
struct NBDBitmapInteropTests {
    /// Maps, context lists and qemu-img's x-dirty-bitmap view equal qemu-nbd's, for each
    /// bitmap (enabled, 512-byte granularity, disabled) and with several -B.
    @Test(arguments: [["-r", "-B", "b0"], ["-r", "-B", "b1"], ["-r", "-B", "off"], ["-B", "off", "-B", "b0"],
                      ["-r", "-A", "-B", "b1", "-B", "off"]])
    func viewsMatchQemuNbd(_ options: [String]) throws {
        let dir = TempDir("nbdbm")
        let image = try BitmapFixtures.qemuImage(dir, granularity: 4096)
        let names = options.enumerated().filter { $0.offset > 0 && options[$0.offset - 1] == "-B" }.map(\.element)
        func views(_ tool: String) throws -> [String] {
            try NBDHarness.with(tool, ["-t", "-f", "qcow2"] + options, image: image, dir: dir, tag: tool) { s in
                var out: [String] = []
                let list = try mustRun("nbdinfo", "--json", s.uri).stdout
                out.append(list.split(separator: "\n").filter { $0.contains(":") && $0.contains("\"qemu:") || $0.contains("base:") }
                    .joined(separator: "\n"))
                for n in names {
                    out.append(try mustRun("nbdinfo", "--map=qemu:dirty-bitmap:\(n)", s.uri).stdout)
                    out.append(try mustRun("qemu-img", "map", "--output=json", "--image-opts",
                                           "driver=nbd,server.type=unix,server.path=\(s.socket),x-dirty-bitmap=qemu:dirty-bitmap:\(n)").stdout)
                }
                return out
            }
        }
        let ours = try views("nbd"), theirs = try views("qemu-nbd")
        #expect(ours == theirs)
        #expect(ours.count == 1 + 2 * names.count)
    }

    /// Through a writable export, a client's writes mark the exported enabled bitmap as
    /// qemu-nbd's do, and the image is stored with them.
    @Test func writesThroughTheExportMarkTheBitmap() throws {
        let dir = TempDir("nbdbm")
        let base = try BitmapFixtures.qemuImage(dir)
        var results: [[String]] = []
        for tool in ["nbd", "qemu-nbd"] {
            let image = dir.file("\(tool).qcow2")
            try FileManager.default.copyItem(atPath: base, toPath: image)
            let maps = try NBDHarness.with(tool, ["-t", "-f", "qcow2", "-B", "b1", "-B", "off"], image: image, dir: dir, tag: tool) { s in
                try mustRun("qemu-io", "-f", "raw", "-c", "write 3M 5000", "-c", "write -z 10M 1M", s.uri)
                return [try mustRun("nbdinfo", "--map=qemu:dirty-bitmap:b1", s.uri).stdout,
                        try mustRun("nbdinfo", "--map=qemu:dirty-bitmap:off", s.uri).stdout]
            }
            results.append(maps + [try BitmapFixtures.map("qemu-nbd", image, "b1", dir: dir)])
        }
        #expect(results[0] == results[1])
        #expect(results[0][0] == results[0][2])
    }

    /// Refusals: an unknown name, an in-use bitmap — same message and status as qemu-nbd.
    @Test(arguments: ["nope", "b0"])
    func refusalsMatchQemuNbd(_ name: String) throws {
        let dir = TempDir("nbdbm")
        let image = try BitmapFixtures.qemuImage(dir)
        try BitmapFixtures.killWriter(image, dir: dir)
        let q = try run("qemu-nbd", "-r", "-k", dir.file("q.sock"), "-f", "qcow2", "-B", name, image)
        let o = try run(Tools.executable("nbd") ?? "nbd", ["-r", "-k", dir.file("o.sock"), "-f", "qcow2", "-B", name, image])
        #expect(o.status == q.status && q.status != 0)
        #expect(o.stderr.replacingOccurrences(of: "nbd:", with: "") == q.stderr.replacingOccurrences(of: "qemu-nbd:", with: ""))
    }

    /// The library refuses an enabled bitmap on a read-only export of a writable node, as
    /// qemu-nbd's export code does, and marks exported bitmaps busy while exported.
    @Test func exportChecks() async throws {
        let dir = TempDir("nbdbm")
        let image = try BitmapFixtures.qemuImage(dir)
        let node = try await ImageOpener.open(image, options: OpenOptions(format: "qcow2"))
        let q = try #require(node as? Qcow2Node)
        let b0 = try #require(q.persistentBitmaps.named("b0")), off = try #require(q.persistentBitmaps.named("off"))
        #expect(throws: BlockError.self) { _ = try NBDExport(node: node, options: .init(readOnly: true, bitmaps: [b0])) }
        do {
            let e = try NBDExport(node: node, options: .init(readOnly: true, bitmaps: [off]))
            #expect(off.isBusy && e.info.bitmapNames == ["off"])
            await #expect(throws: BlockError.self) { try await q.removePersistentBitmap(named: "off") }
        }
        #expect(!off.isBusy)
        try await node.close()
    }
}
