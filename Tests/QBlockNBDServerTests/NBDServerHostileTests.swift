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

/// A raw NBD client over a Unix socket, blocking, with a 30 s receive timeout. Used only
/// from pool threads (never on the cooperative pool).
final class RawNBDClient {
    let fd: Int32

    init?(path: String) {
        fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { return nil }
        var tv = timeval(tv_sec: 30, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        withUnsafeMutableBytes(of: &addr.sun_path) { $0.copyBytes(from: bytes + [0]) }
        let r = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        if r != 0 {
            close(fd)
            return nil
        }
    }

    deinit { close(fd) }

    func send(_ b: [UInt8]) {
        var done = 0
        while done < b.count {
            let n = b.withUnsafeBytes { Glibc.send(fd, $0.baseAddress! + done, b.count - done, Int32(MSG_NOSIGNAL)) }
            if n <= 0 { return }
            done += n
        }
    }

    /// Exactly `n` bytes, or nil on end of stream, error or timeout.
    func recv(_ n: Int) -> [UInt8]? {
        var b = [UInt8](repeating: 0, count: n)
        var done = 0
        while done < n {
            let r = b.withUnsafeMutableBytes { Glibc.recv(fd, $0.baseAddress! + done, n - done, 0) }
            if r <= 0 { return nil }
            done += r
        }
        return b
    }

    /// True if the server closed the connection (within the timeout): end of stream, or a
    /// reset when it closed with bytes of ours unread.
    func isClosedByServer() -> Bool {
        var b: UInt8 = 0
        let r = Glibc.recv(fd, &b, 1, 0)
        return r == 0 || (r < 0 && errno == ECONNRESET)
    }

    func option(_ option: NBD.Option, _ payload: [UInt8] = []) {
        var w = NBDWriter()
        w.u64(NBD.optionMagic)
        w.u32(option.rawValue)
        w.u32(UInt32(payload.count))
        w.append(payload)
        send(w.bytes)
    }

    /// One option reply: (type, payload).
    func optionReply() -> (UInt32, [UInt8])? {
        guard let h = recv(20) else { return nil }
        var r = NBDReader(h)
        _ = try? r.u64()
        _ = try? r.u32()
        guard let t = try? r.u32(), let n = try? r.u32(), let p = recv(Int(n)) else { return nil }
        return (t, p)
    }

    /// Greeting and client flags.
    func start() -> Bool {
        guard let g = recv(18), g.prefix(8) == ArraySlice(NBDEncode.greeting([]).prefix(8)) else { return false }
        send([0, 0, 0, 3])
        return true
    }

    /// The whole handshake up to GO for `name`; true once in transmission.
    func go(_ name: String, structured: Bool = false) -> Bool {
        guard start() else { return false }
        if structured {
            option(.structuredReply)
            guard optionReply()?.0 == NBD.OptionReply.ack.rawValue else { return false }
        }
        option(.go, NBDInfoRequest(exportName: name, requests: []).encode())
        for _ in 0..<10 {
            guard let (t, _) = optionReply() else { return false }
            if t == NBD.OptionReply.ack.rawValue { return true }
            if t != NBD.OptionReply.info.rawValue { return false }
        }
        return false
    }

    func request(_ type: UInt16, flags: UInt16 = 0, offset: UInt64, length: UInt32, cookie: UInt64, payload: [UInt8] = []) {
        send(NBDRequest(flags: NBD.CommandFlags(rawValue: flags), type: type, cookie: cookie, offset: offset, length: length).encode() + payload)
    }

    /// A simple reply: (error, cookie).
    func simpleReply() -> (UInt32, UInt64)? {
        guard let h = recv(16) else { return nil }
        var r = NBDReader(h)
        guard (try? r.u32()) == NBD.simpleReplyMagic, let e = try? r.u32(), let c = try? r.u64() else { return nil }
        return (e, c)
    }
}

@Suite struct NBDServerHostileTests {
    static func pattern(_ offset: Int, _ count: Int) -> [UInt8] {
        (offset..<(offset + count)).map { UInt8(truncatingIfNeeded: $0 / 512 &+ $0 % 251) }
    }

    /// Each malformed message of the list below, each on its own connection; after all of
    /// them the server still serves a well-behaved client, and has closed every connection.
    @Test func malformedClientsDoNotHurtOthers() async throws {
        let dir = TempDir("nbdh")
        let path = dir.file("disk.raw")
        let size = 1 << 20
        try writeFile(path, at: 0, Self.pattern(0, size))
        let node = try await ImageOpener.open(path, options: OpenOptions(format: "raw"))
        let server = NBDServer(exports: [try NBDExport(name: "rw", node: node),
                                         try NBDExport(name: "ro", node: node, options: .init(readOnly: true))],
                               options: .init(maxClients: 8, persistent: true))
        let sock = dir.file("s.sock")
        try server.listen(unix: sock)
        try server.start()
        let running = Task { try await server.run() }

        let failures: [String] = await IOThreadPool.shared.run {
            var failures: [String] = []
            func check(_ ok: Bool, _ what: String) { if !ok { failures.append(what) } }
            let EINVAL: UInt32 = 22, EPERM: UInt32 = 1

            // Bad option magic: disconnect.
            if let c = RawNBDClient(path: sock) {
                check(c.start(), "greeting")
                c.send([UInt8](repeating: 0x55, count: 16))
                check(c.isClosedByServer(), "bad option magic closes")
            } else { check(false, "connect") }
            // Unknown client flags: disconnect.
            if let c = RawNBDClient(path: sock) {
                _ = c.recv(18)
                c.send([0xff, 0, 0, 0])
                check(c.isClosedByServer(), "unknown client flags close")
            }
            // Huge option length: NBD_REP_ERR_TOO_BIG, then disconnect.
            if let c = RawNBDClient(path: sock) {
                check(c.start(), "greeting")
                var w = NBDWriter()
                w.u64(NBD.optionMagic)
                w.u32(NBD.Option.go.rawValue)
                w.u32(0x7fff_ffff)
                c.send(w.bytes)
                check(c.optionReply()?.0 == NBD.OptionReply.errTooBig.rawValue, "huge option: TOO_BIG")
                check(c.isClosedByServer(), "huge option closes")
            }
            // Malformed GO payload and unknown export: errors, connection kept.
            if let c = RawNBDClient(path: sock) {
                check(c.start(), "greeting")
                c.option(.go, [0, 0, 0, 200, 1])
                check(c.optionReply()?.0 == NBD.OptionReply.errInvalid.rawValue, "malformed GO: INVALID")
                c.option(.go, NBDInfoRequest(exportName: "none", requests: []).encode())
                check(c.optionReply()?.0 == NBD.OptionReply.errUnknown.rawValue, "unknown export: UNKNOWN")
                c.option(.setMetaContext, NBDMetaContextRequest(exportName: "rw", queries: ["base:allocation"]).encode())
                check(c.optionReply()?.0 == NBD.OptionReply.errInvalid.rawValue, "SET_META before STRUCTURED: INVALID")
                // Then hang up in the middle of an option payload.
                var w = NBDWriter()
                w.u64(NBD.optionMagic)
                w.u32(NBD.Option.go.rawValue)
                w.u32(1000)
                c.send(w.bytes + [1, 2, 3])
            }
            // Transmission: errors that keep the connection.
            if let c = RawNBDClient(path: sock) {
                check(c.go("rw"), "GO rw")
                c.request(0, offset: 0, length: 64 << 20, cookie: 1)
                check(c.simpleReply().map { $0 == (EINVAL, 1) } == true, "huge read: EINVAL")
                c.request(0, offset: UInt64(size), length: 512, cookie: 2)
                check(c.simpleReply().map { $0 == (EINVAL, 2) } == true, "read past end: EINVAL")
                c.request(0, offset: UInt64.max - 100, length: 512, cookie: 3)
                check(c.simpleReply().map { $0 == (EINVAL, 3) } == true, "offset overflow: EINVAL")
                c.request(99, offset: 0, length: 512, cookie: 4)
                check(c.simpleReply().map { $0 == (EINVAL, 4) } == true, "unknown command: EINVAL")
                c.request(0, flags: 0x8000, offset: 0, length: 512, cookie: 5)
                check(c.simpleReply().map { $0 == (EINVAL, 5) } == true, "unknown flag: EINVAL")
                c.request(7, offset: 0, length: 512, cookie: 6)
                check(c.simpleReply().map { $0 == (EINVAL, 6) } == true, "block status not negotiated: EINVAL")
                c.request(0, offset: 4096, length: 4096, cookie: 7)
                let ok = c.simpleReply().map { $0 == (0, 7) } == true
                check(ok && c.recv(4096) == Self.pattern(4096, 4096), "valid read after errors")
                // Bad request magic: disconnect.
                c.send([UInt8](repeating: 0x11, count: 28))
                check(c.isClosedByServer(), "bad request magic closes")
            }
            // Write on the read-only export: EPERM, the payload is skipped, reads go on.
            if let c = RawNBDClient(path: sock) {
                check(c.go("ro"), "GO ro")
                c.request(1, offset: 0, length: 8192, cookie: 10, payload: [UInt8](repeating: 0xee, count: 8192))
                check(c.simpleReply().map { $0 == (EPERM, 10) } == true, "write on read-only: EPERM")
                c.request(6, offset: 0, length: 8192, cookie: 11)
                check(c.simpleReply().map { $0 == (EPERM, 11) } == true, "zero on read-only: EPERM")
                c.request(0, offset: 0, length: 512, cookie: 12)
                check(c.simpleReply().map { $0 == (0, 12) } == true && c.recv(512) == Self.pattern(0, 512), "read on read-only")
            }
            // A write longer than the protocol allows: EINVAL, then disconnect.
            if let c = RawNBDClient(path: sock) {
                check(c.go("rw"), "GO rw")
                c.request(1, offset: 0, length: (32 << 20) + 1, cookie: 20, payload: [UInt8](repeating: 0xee, count: 4096))
                check(c.simpleReply().map { $0 == (EINVAL, 20) } == true, "huge write: EINVAL")
                check(c.isClosedByServer(), "huge write closes")
            }
            // Hang up in the middle of a write's data, and right after the greeting.
            if let c = RawNBDClient(path: sock) {
                check(c.go("rw"), "GO rw")
                c.request(1, offset: 0, length: 1 << 20, cookie: 30, payload: [UInt8](repeating: 0xee, count: 100))
            }
            if let c = RawNBDClient(path: sock) { _ = c.recv(18) }

            // A well-behaved client: 40 pipelined reads (more than the server takes in flight),
            // answered by cookie, possibly out of order.
            if let c = RawNBDClient(path: sock) {
                check(c.go("rw"), "GO rw (good client)")
                var want: [UInt64: Int] = [:]
                for i in 0..<40 {
                    let off = (i * 7919 * 512) % (size - 8192)
                    want[UInt64(100 + i)] = off
                    c.request(0, offset: UInt64(off), length: 8192, cookie: UInt64(100 + i))
                }
                var seen = 0
                for _ in 0..<40 {
                    guard let (e, cookie) = c.simpleReply(), e == 0, let off = want.removeValue(forKey: cookie),
                          let data = c.recv(8192) else { break }
                    if data == Self.pattern(off, 8192) { seen += 1 }
                }
                check(seen == 40, "pipelined reads: \(seen)/40 correct")
                // A write, read back, and a clean disconnect.
                c.request(1, flags: 1, offset: 512, length: 512, cookie: 200, payload: [UInt8](repeating: 0x42, count: 512))
                check(c.simpleReply().map { $0 == (0, 200) } == true, "write")
                c.request(0, offset: 512, length: 512, cookie: 201)
                check(c.simpleReply().map { $0 == (0, 201) } == true && c.recv(512) == [UInt8](repeating: 0x42, count: 512), "read back")
                c.request(2, offset: 0, length: 0, cookie: 202)
                check(c.isClosedByServer(), "disconnect")
            }
            return failures
        }
        #expect(failures.isEmpty, "\(failures)")
        // Every connection ends (its socket closed) within a bounded time.
        let deadline = Date().addingTimeInterval(10)
        while server.clientCount > 0 && Date() < deadline { try await Task.sleep(nanoseconds: 20_000_000) }
        #expect(server.clientCount == 0)
        await server.shutdown()
        try await running.value
        #expect(!FileManager.default.fileExists(atPath: sock))
        try await node.close()
    }

    /// Structured replies: a sparse read sends holes as OFFSET_HOLE chunks, DF asks for one
    /// data chunk; block status reports base:allocation.
    @Test func structuredReadsAndBlockStatus() async throws {
        let dir = TempDir("nbdh")
        let path = dir.file("sparse.raw")
        try truncateFile(path, to: 1 << 20)
        try writeFile(path, at: 0, [UInt8](repeating: 7, count: 65536))
        let node = try await ImageOpener.open(path, options: OpenOptions(format: "raw", readOnly: true))
        let server = NBDServer(exports: [try NBDExport(node: node, options: .init(readOnly: true))],
                               options: .init(maxClients: 1, persistent: false))
        let sock = dir.file("s.sock")
        try server.listen(unix: sock)
        try server.start()
        let running = Task { try await server.run() }
        let failures: [String] = await IOThreadPool.shared.run {
            var failures: [String] = []
            func check(_ ok: Bool, _ what: String) { if !ok { failures.append(what) } }
            guard let c = RawNBDClient(path: sock) else { return ["connect"] }
            check(c.start(), "greeting")
            c.option(.structuredReply)
            check(c.optionReply()?.0 == NBD.OptionReply.ack.rawValue, "structured")
            c.option(.setMetaContext, NBDMetaContextRequest(exportName: "", queries: ["base:allocation"]).encode())
            check(c.optionReply()?.0 == NBD.OptionReply.metaContext.rawValue, "context")
            check(c.optionReply()?.0 == NBD.OptionReply.ack.rawValue, "ack")
            c.option(.go, NBDInfoRequest(exportName: "", requests: []).encode())
            var acked = false
            for _ in 0..<6 where !acked { acked = c.optionReply()?.0 == NBD.OptionReply.ack.rawValue }
            check(acked, "GO")
            // (chunks) of one reply: [(flags, type, payload)]
            func chunks() -> [(UInt16, UInt16, [UInt8])] {
                var out: [(UInt16, UInt16, [UInt8])] = []
                for _ in 0..<64 {
                    guard let h = c.recv(20) else { break }
                    var r = NBDReader(h)
                    _ = try? r.u32()
                    let f = (try? r.u16()) ?? 0, t = (try? r.u16()) ?? 0
                    _ = try? r.u64()
                    let n = Int((try? r.u32()) ?? 0)
                    out.append((f, t, c.recv(n) ?? []))
                    if f & 1 == 1 { break }
                }
                return out
            }
            c.request(0, offset: 0, length: 131072, cookie: 1)
            let sparse = chunks()
            check(sparse.map(\.1) == [NBD.ReplyType.offsetData.rawValue, NBD.ReplyType.offsetHole.rawValue], "sparse read chunks \(sparse.map(\.1))")
            check(sparse.first?.2.count == 8 + 65536 && sparse.first?.2.dropFirst(8).allSatisfy { $0 == 7 } == true, "data chunk")
            check(sparse.last?.2 == [0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0], "hole chunk at 64k, 64k long")
            c.request(0, flags: NBD.CommandFlags.dontFragment.rawValue, offset: 0, length: 131072, cookie: 2)
            let whole = chunks()
            check(whole.count == 1 && whole[0].2.count == 8 + 131072, "DF: one data chunk")
            c.request(7, offset: 0, length: 1 << 20, cookie: 3)
            let bs = chunks()
            check(bs.count == 1 && bs[0].2 == [0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0x0f, 0, 0, 0, 0, 0, 3], "block status \(bs.map(\.2))")
            c.request(7, flags: NBD.CommandFlags.reqOne.rawValue, offset: 65536, length: 1 << 19, cookie: 4)
            let one = chunks()
            check(one.count == 1 && one[0].2 == [0, 0, 0, 0, 0, 0x08, 0, 0, 0, 0, 0, 3], "REQ_ONE \(one.map(\.2))")
            c.request(0, offset: 1 << 20, length: 1, cookie: 5)
            let err = chunks()
            check(err.count == 1 && err[0].1 == NBD.ReplyType.error.rawValue && Array(err[0].2.prefix(4)) == [0, 0, 0, 22], "error chunk")
            c.request(2, offset: 0, length: 0, cookie: 6)
            check(c.isClosedByServer(), "disconnect")
            return failures
        }
        #expect(failures.isEmpty, "\(failures)")
        // Not persistent: run() ends by itself once the only client has left.
        try await running.value
        try await node.close()
    }
}
