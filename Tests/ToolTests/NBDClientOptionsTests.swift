import Foundation
import Testing
import QBlock
import TestSupport

/// The NBD client's `BlockdevOptionsNbd` members beyond `server` and `export`, through
/// `img map --image-opts driver=nbd,...`, against qemu-img on the same server: `x-dirty-bitmap`
/// (a bitmap or allocation-depth context read as block status), `tls-creds` (refused: no TLS),
/// `reconnect-delay` (only 0), `open-timeout` (retrying the first connection).
@Suite(.serialized) struct NBDClientOptionsTests {
    static let ready = Tools.qemuAvailable && Tools.which("qemu-nbd") != nil && Tools.executable("nbd") != nil

    /// `driver=nbd,server.type=unix,server.path=SOCKET` plus `extra`.
    static func opts(_ socket: String, _ extra: String = "") -> String {
        "driver=nbd,server.type=unix,server.path=\(socket)" + (extra.isEmpty ? "" : ",\(extra)")
    }

    /// An image with two bitmaps: b0 dirty at 1M+1M and 3M+1M, b1 (granularity 512k) at
    /// 3M+1M; written so that base:allocation and the bitmaps disagree.
    static func bitmapImage(_ dir: TempDir) throws -> String {
        let image = dir.file("bm.qcow2")
        try mustRun("qemu-img", "create", "-q", "-f", "qcow2", image, "10M")
        try mustRun("qemu-io", "-f", "qcow2", "-c", "write -P 1 0 512k", image)
        try mustRun("qemu-img", "bitmap", "--add", image, "b0")
        try mustRun("qemu-io", "-f", "qcow2", "-c", "write -P 2 1M 1M", image)
        try mustRun("qemu-img", "bitmap", "--add", "-g", "512k", image, "b1")
        try mustRun("qemu-io", "-f", "qcow2", "-c", "write -P 3 3M 1M", "-c", "write -z 6M 64k", image)
        return image
    }

    /// `img map --output=json --image-opts OPTS` and qemu-img's: same status, same bytes.
    func expectSameMap(_ options: String, _ label: String) throws {
        let ours = try run("img", "map", "--output=json", "--image-opts", options)
        let theirs = try run("qemu-img", "map", "--output=json", "--image-opts", options)
        #expect(theirs.status == 0, "\(label): \(theirs)")
        #expect(ours.status == theirs.status && ours.stdout == theirs.stdout && ours.stderr == asImg(theirs.stderr),
                "\(label): ours \(ours) vs qemu-img \(theirs)")
    }

    @Test(.enabled(if: ready, "needs qemu-nbd, qemu-img and the built tools"), arguments: ["qemu-nbd", "nbd"])
    func dirtyBitmapMapMatchesQemuImg(server: String) throws {
        let dir = TempDir()
        let image = try Self.bitmapImage(dir)
        try NBDHarness.with(server, ["-t", "-r", "-f", "qcow2", "-B", "b0", "-B", "b1"], image: image, dir: dir, tag: "bm") { s in
            try expectSameMap(Self.opts(s.socket), "\(server) base:allocation")
            for b in ["b0", "b1"] {
                try expectSameMap(Self.opts(s.socket, "x-dirty-bitmap=qemu:dirty-bitmap:\(b)"), "\(server) \(b)")
            }
            // Under a raw format node: raw hands the question to its file, as QEMU's.
            try expectSameMap("driver=raw,file.driver=nbd,file.server.type=unix,file.server.path=\(s.socket),"
                              + "file.x-dirty-bitmap=qemu:dirty-bitmap:b0", "\(server) raw over nbd")
            // A dirty run is not data and not present: what the bitmap says, not base:allocation.
            let b0 = try run("img", "map", "--output=json", "--image-opts", Self.opts(s.socket, "x-dirty-bitmap=qemu:dirty-bitmap:b0"))
            #expect(b0.stdout.contains(#"{ "start": 1048576, "length": 1048576, "depth": 0, "present": false, "zero": false, "data": false}"#),
                    "\(b0)")
            // A bitmap the server does not offer fails the open as qemu-img's does.
            let missing = Self.opts(s.socket, "x-dirty-bitmap=qemu:dirty-bitmap:nosuch")
            let ours = try run("img", "map", "--output=json", "--image-opts", missing)
            let theirs = try run("qemu-img", "map", "--output=json", "--image-opts", missing)
            #expect(theirs.status == 1 && ours.status == 1 && ours.stderr == asImg(theirs.stderr), "ours \(ours) vs \(theirs)")
            #expect(ours.stderr == "img: Could not open '\(missing)': Could not open image: Invalid argument\n")
        }
    }

    @Test(.enabled(if: ready, "needs qemu-nbd, qemu-img and the built tools"), arguments: ["qemu-nbd", "nbd"])
    func allocationDepthMapMatchesQemuImg(server: String) throws {
        let dir = TempDir()
        let top = try NBDHarness.chain(dir)
        try NBDHarness.with(server, ["-t", "-r", "-f", "qcow2", "-A"], image: top, dir: dir, tag: "ad") { s in
            try expectSameMap(Self.opts(s.socket, "x-dirty-bitmap=qemu:allocation-depth"), "\(server) allocation-depth")
            let m = try run("img", "map", "--output=json", "--image-opts", Self.opts(s.socket, "x-dirty-bitmap=qemu:allocation-depth"))
            // Depth 2 (the backing file) reads as "zero": true, "data": true.
            #expect(m.stdout.contains(#""present": true, "zero": true, "data": true"#), "\(m)")
        }
        // Without -A the server offers no qemu:allocation-depth: the open fails.
        try NBDHarness.with(server, ["-t", "-r", "-f", "qcow2"], image: top, dir: dir, tag: "noad") { s in
            let o = Self.opts(s.socket, "x-dirty-bitmap=qemu:allocation-depth")
            let ours = try run("img", "map", "--output=json", "--image-opts", o)
            let theirs = try run("qemu-img", "map", "--output=json", "--image-opts", o)
            #expect(theirs.status == 1 && ours.status == 1 && ours.stderr == asImg(theirs.stderr), "ours \(ours) vs \(theirs)")
        }
    }

    @Test(.enabled(if: ready, "needs qemu-nbd, qemu-img and the built tools"))
    func tlsCredsAreRefusedNotIgnored() throws {
        let dir = TempDir()
        let image = dir.file("t.raw")
        try mustRun("qemu-img", "create", "-q", "-f", "raw", image, "1M")
        try NBDHarness.with("nbd", ["-t", "-r", "-f", "raw"], image: image, dir: dir, tag: "tls") { s in
            // No TLS credentials object can exist here, so the id is unknown, in qemu-img's words.
            for extra in ["tls-creds=tls0", "tls-creds=tls0,tls-hostname=example.org"] {
                let o = Self.opts(s.socket, extra)
                let ours = try run("img", "map", "--output=json", "--image-opts", o)
                let theirs = try run("qemu-img", "map", "--output=json", "--image-opts", o)
                #expect(ours.status == 1 && ours.stdout.isEmpty, "\(ours)")
                #expect(ours.stderr == "img: Could not open '\(o)': No TLS credentials with id 'tls0'\n", "\(ours)")
                #expect(ours.stderr == asImg(theirs.stderr), "ours \(ours) vs \(theirs)")
            }
            // tls-hostname alone has no effect, in QEMU as here: the plain open works.
            try expectSameMap(Self.opts(s.socket, "tls-hostname=example.org"), "tls-hostname alone")
        }
    }

    @Test(.enabled(if: ready, "needs qemu-nbd, qemu-img and the built tools"))
    func reconnectDelayOnlyZero() throws {
        let dir = TempDir()
        let image = dir.file("r.raw")
        try mustRun("qemu-img", "create", "-q", "-f", "raw", image, "1M")
        try NBDHarness.with("nbd", ["-t", "-r", "-f", "raw"], image: image, dir: dir, tag: "rd") { s in
            try expectSameMap(Self.opts(s.socket, "reconnect-delay=0"), "reconnect-delay=0")
            let o = Self.opts(s.socket, "reconnect-delay=5")
            let r = try run("img", "map", "--output=json", "--image-opts", o)
            #expect(r.status == 1 && r.stdout.isEmpty)
            #expect(r.stderr == "img: Could not open '\(o)': reconnect-delay=5 is not supported: the NBD client does not reconnect after losing its connection (only 0 is accepted)\n",
                    "\(r)")
        }
    }

    @Test(.enabled(if: ready, "needs qemu-nbd, qemu-img and the built tools"))
    func openTimeoutRetriesUntilTheServerListens() async throws {
        let dir = TempDir()
        let image = dir.file("o.raw")
        try mustRun("qemu-img", "create", "-q", "-f", "raw", image, "1M")
        try mustRun("qemu-io", "-f", "raw", "-c", "write -P 7 0 64k", image)
        let socket = dir.file("late.sock")
        // Without open-timeout: one attempt, qemu-img's error.
        let once = Self.opts(socket)
        let a = try run("img", "map", "--output=json", "--image-opts", once)
        let b = try run("qemu-img", "map", "--output=json", "--image-opts", once)
        #expect(a.status == 1 && a.stderr == asImg(b.stderr) && a.stderr.contains("Failed to connect to '\(socket)'"), "\(a) vs \(b)")

        // With open-timeout=2 and no server: it gives up after about 2 s with the last error.
        let start = Date()
        let c = try run("img", "map", "--output=json", "--image-opts", Self.opts(socket, "open-timeout=2"))
        let took = Date().timeIntervalSince(start)
        let d = try run("qemu-img", "map", "--output=json", "--image-opts", Self.opts(socket, "open-timeout=2"))
        #expect(c.status == 1 && c.stderr == asImg(d.stderr), "\(c) vs \(d)")
        #expect(took >= 1.9 && took < 10, "gave up after \(took) s")

        // A server that accepts and never answers: the first attempt is still waiting when
        // the time is up, and there is no earlier error to report.
        let mute = dir.file("mute.sock")
        let fd = Glibc.socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { p in
            for (i, b) in mute.utf8.enumerated() where i < p.count - 1 { p[i] = b }
        }
        let bound = withUnsafePointer(to: &addr) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        #expect(bound == 0 && listen(fd, 8) == 0)
        let e = try run("img", "map", "--output=json", "--image-opts", Self.opts(mute, "open-timeout=1"))
        let f = try run("qemu-img", "map", "--output=json", "--image-opts", Self.opts(mute, "open-timeout=1"))
        #expect(e.status == 1 && e.stderr == asImg(f.stderr) && e.stderr.hasSuffix(": Connection attempt cancelled by timeout\n"),
                "\(e) vs \(f)")

        // The server starts 1.5 s after the client: the client retries and gets through.
        let client = Task.detached { try run("img", "map", "--output=json", "--image-opts", Self.opts(socket, "open-timeout=20")) }
        try await Task.sleep(nanoseconds: 1_500_000_000)
        let server = try NBDHarness.start("nbd", ["-r", "-f", "raw", "-t"], image: image, dir: dir, tag: "late")
        defer { server.stop() }
        let late = try await client.value
        let direct = try run("qemu-img", "map", "--output=json", "--image-opts", Self.opts(server.socket))
        #expect(late.status == 0 && late.stdout == direct.stdout, "\(late) vs \(direct)")
    }
}
