import Foundation
import QBlock
import Testing
import TestSupport
@testable import QMachine

/// Running the `vm` tool with a deadline: it is killed (SIGKILL) if it outlives it, so a
/// test never hangs on a guest that does not stop.
enum VMTool {
    /// The vm executable: $QMACHINE_VM, else a release build next to this build (the
    /// interpreter is many times faster optimized), else this build's.
    static var path: String? {
        let fm = FileManager.default
        if let p = ProcessInfo.processInfo.environment["QMACHINE_VM"], fm.isExecutableFile(atPath: p) { return p }
        if let dir = Tools.binDirectory {
            let release = URL(fileURLWithPath: dir).deletingLastPathComponent().appendingPathComponent("release/vm").path
            if fm.isExecutableFile(atPath: release) { return release }
        }
        return Tools.executable("vm")
    }

    struct Result: CustomStringConvertible {
        var status: Int32
        var stdout: String
        var stderr: String
        var timedOut: Bool
        var seconds: Double
        var description: String { "exit \(status)\(timedOut ? " (killed after timeout)" : "") in \(String(format: "%.1f", seconds)) s\nstdout:\n\(stdout.suffix(6000))\nstderr:\n\(stderr)" }
    }

    /// Runs vm; each time its output first contains `replies[i].after`, `replies[i].send`
    /// is written to its standard input (closed once every reply is sent).
    static func run(_ args: [String], timeout: Double, replies: [(after: String, send: String)] = []) async throws -> Result {
        guard let path else { throw RunError.notFound("vm") }
        let proc = Process()
        proc.executableURL = URL(fileURLWithPath: path)
        proc.arguments = args
        let out = Pipe(), err = Pipe(), input = Pipe()
        proc.standardOutput = out
        proc.standardError = err
        proc.standardInput = replies.isEmpty ? FileHandle.nullDevice : input
        final class Box: @unchecked Sendable {
            let lock = NSLock()
            var data = Data()
            func append(_ d: Data) { lock.lock(); data.append(d); lock.unlock() }
            var text: String { lock.lock(); defer { lock.unlock() }; return String(decoding: data, as: UTF8.self) }
        }
        let o = Box(), e = Box()
        let group = DispatchGroup()
        let start = ContinuousClock.now
        try proc.run()
        for (pipe, box) in [(out, o), (err, e)] {
            group.enter()
            Thread {
                let h = pipe.fileHandleForReading
                while true {
                    let d = h.availableData
                    if d.isEmpty { break }
                    box.append(d)
                }
                group.leave()
            }.start()
        }
        var pending = replies[...]
        if pending.isEmpty == false { try? input.fileHandleForReading.close() }
        var timedOut = false
        while proc.isRunning {
            if let next = pending.first, o.text.contains(next.after) {
                try? input.fileHandleForWriting.write(contentsOf: Data(next.send.utf8))
                pending = pending.dropFirst()
                if pending.isEmpty { try? input.fileHandleForWriting.close() }
            }
            if ContinuousClock.now - start > .milliseconds(Int(timeout * 1000)) {
                timedOut = true
                kill(proc.processIdentifier, SIGKILL)
                break
            }
            try? await Task.sleep(for: .milliseconds(50))
        }
        proc.waitUntilExit()
        while group.wait(timeout: .now()) == .timedOut { try? await Task.sleep(for: .milliseconds(10)) }
        let d = ContinuousClock.now - start
        return Result(status: proc.terminationStatus, stdout: o.text, stderr: e.text, timedOut: timedOut,
                      seconds: Double(d.components.seconds) + Double(d.components.attoseconds) / 1e18)
    }
}

/// Tiny hand-assembled RISC-V Images: a valid header, then a few instructions at offset 64.
enum TinyKernel {
    static func image(_ code: [UInt32]) -> [UInt8] {
        var b = LoaderTests.header(imageSize: 0x1000)
        b.replaceSubrange(0..<4, with: le(0x0400_006f))        // j 64 (over the header)
        b.replaceSubrange(4..<8, with: [0, 0, 0, 0])
        for w in code { b += le(w) }
        b += [UInt8](repeating: 0, count: 4096 - b.count)
        return b
    }
    static func le(_ w: UInt32) -> [UInt8] { [UInt8(w & 0xff), UInt8(w >> 8 & 0xff), UInt8(w >> 16 & 0xff), UInt8(w >> 24)] }

    /// Writes "hi\n" to the UART at 0x1000_0000.
    static let hello: [UInt32] = [
        0x1000_02b7,                 // lui   t0, 0x10000
        0x0680_0313, 0x0062_8023,    // li t1, 'h'; sb t1, 0(t0)
        0x0690_0313, 0x0062_8023,    // li t1, 'i'; sb t1, 0(t0)
        0x00a0_0313, 0x0062_8023,    // li t1, '\n'; sb t1, 0(t0)
    ]
    /// SBI SRST system_reset(type in a0).
    static func systemReset(_ type: UInt32) -> [UInt32] {
        [0x5352_58b7, 0x3548_8893,   // li a7, 0x53525354 ("SRST")
         0x0000_0813,                // li a6, 0 (system_reset)
         type << 20 | 0x513,         // li a0, type (0 shutdown, 1 cold reboot)
         0x0000_0593,                // li a1, 0
         0x0000_0073,                // ecall
         0x0000_006f]                // j .
    }
    static let shutdown = image(hello + systemReset(0))
    static let reboot = image(systemReset(1))
    /// An all-zero word: illegal instruction, with stvec still 0.
    static let crash = image([0])
    /// Spins forever (`j .`).
    static let spin = image([0x0000_006f])
}

@Suite struct VMToolTests {
    let dir = TempDir("vmtool")

    func file(_ name: String, _ bytes: [UInt8]) -> String {
        let p = dir.file(name)
        #expect(FileManager.default.createFile(atPath: p, contents: Data(bytes)))
        return p
    }

    @Test func guestPowerOffExitsZeroAndFlushesTheDrives() async throws {
        guard VMTool.path != nil else { Issue.record("vm not built"); return }
        let k = file("hello.Image", TinyKernel.shutdown)
        try await ImageCreator.create(format: "qcow2", path: dir.file("d.qcow2"), size: 1 << 20)
        let r = try await VMTool.run(["--kernel", k, "--drive", "file=\(dir.file("d.qcow2")),format=qcow2,id=root",
                                      "--memory", "64M"], timeout: 60)
        #expect(r.status == 0 && !r.timedOut, "\(r)")
        #expect(r.stdout == "hi\n", "\(r)")
        if Tools.qemuAvailable {
            // Closed and unlocked: qemu-img can open it for a check.
            let c = try run("qemu-img", ["check", dir.file("d.qcow2")])
            #expect(c.status == 0, "\(c)")
        }
    }

    @Test func serialToAUnixSocket() async throws {
        guard VMTool.path != nil else { Issue.record("vm not built"); return }
        let sock = dir.file("serial.sock")
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        #expect(fd >= 0)
        defer { close(fd) }
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { p in
            for (i, c) in sock.utf8.enumerated() { p[i] = c }
        }
        let bound = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        #expect(bound == 0 && listen(fd, 1) == 0)
        // Accept and read to end of file on a plain thread (not the cooperative pool).
        final class Box: @unchecked Sendable { var data: [UInt8] = []; let done = DispatchSemaphore(value: 0) }
        let box = Box()
        Thread {
            let c = accept(fd, nil, nil)
            var buf = [UInt8](repeating: 0, count: 256)
            while c >= 0 {
                let n = buf.withUnsafeMutableBytes { read(c, $0.baseAddress, 256) }
                if n <= 0 { break }
                box.data += buf[0..<n]
            }
            if c >= 0 { close(c) }
            box.done.signal()
        }.start()
        let r = try await VMTool.run(["--kernel", file("hello.Image", TinyKernel.shutdown), "--memory", "64M",
                                      "--serial", "unix:\(sock)"], timeout: 60)
        #expect(r.status == 0 && r.stdout.isEmpty, "\(r)")
        while box.done.wait(timeout: .now()) == .timedOut { try await Task.sleep(for: .milliseconds(10)) }
        #expect(String(decoding: box.data, as: UTF8.self) == "hi\n")
        let missing = try await VMTool.run(["--kernel", file("hello2.Image", TinyKernel.shutdown), "--serial", "unix:\(dir.file("none.sock"))"], timeout: 30)
        #expect(missing.status == 1 && missing.stderr.contains("cannot connect to serial socket"), "\(missing)")
    }

    @Test func sigtermStopsTheGuestAndClosesTheDrives() async throws {
        guard let vm = VMTool.path else { Issue.record("vm not built"); return }
        let disk = dir.file("spin.qcow2")
        try await ImageCreator.create(format: "qcow2", path: disk, size: 1 << 20)
        let proc = Process()
        proc.executableURL = URL(fileURLWithPath: vm)
        proc.arguments = ["--kernel", file("spin.Image", TinyKernel.spin), "--memory", "64M", "--drive", "file=\(disk),format=qcow2"]
        let err = Pipe()
        proc.standardError = err
        proc.standardOutput = FileHandle.nullDevice
        proc.standardInput = FileHandle.nullDevice
        try proc.run()
        try await Task.sleep(for: .milliseconds(500))
        #expect(proc.isRunning, "the guest spins")
        proc.terminate()   // SIGTERM
        let start = ContinuousClock.now
        while proc.isRunning && ContinuousClock.now - start < .seconds(20) { try await Task.sleep(for: .milliseconds(20)) }
        if proc.isRunning { kill(proc.processIdentifier, SIGKILL); Issue.record("vm ignored SIGTERM") }
        proc.waitUntilExit()
        let msg = String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        #expect(proc.terminationStatus == 1 && msg.contains("vm: stopped by a signal"), "\(proc.terminationStatus) \(msg)")
        if Tools.qemuAvailable { #expect(try run("qemu-img", ["check", disk]).status == 0, "flushed, closed and unlocked") }
    }

    @Test func rebootRequestIsAnError() async throws {
        guard VMTool.path != nil else { Issue.record("vm not built"); return }
        let r = try await VMTool.run(["--kernel", file("reboot.Image", TinyKernel.reboot), "--memory", "64M"], timeout: 60)
        #expect(r.status == 1 && !r.timedOut, "\(r)")
        #expect(r.stderr.contains("vm: guest requested a reboot"), "\(r)")
    }

    @Test func crashNamesThePC() async throws {
        guard VMTool.path != nil else { Issue.record("vm not built"); return }
        let r = try await VMTool.run(["--kernel", file("crash.Image", TinyKernel.crash), "--memory", "64M"], timeout: 60)
        #expect(r.status != 0 && !r.timedOut, "\(r)")
        #expect(r.stderr.hasPrefix("vm: guest crashed: "), "\(r)")
    }

    @Test(arguments: [
        ("missing kernel", ["--kernel", "/nonexistent/Image"], "vm: kernel '/nonexistent/Image' does not exist"),
        ("not a kernel", ["--kernel", "@text"], "is not a RISC-V Linux Image"),
        ("kernel is a directory", ["--kernel", "/tmp"], "is a directory"),
        ("missing initrd", ["--kernel", "@kernel", "--initrd", "/nonexistent/initrd"], "vm: initrd '/nonexistent/initrd' does not exist"),
        ("bad initrd", ["--kernel", "@kernel", "--initrd", "@garbage"], "is neither a cpio archive nor a compressed one"),
        ("missing drive", ["--kernel", "@kernel", "--drive", "file=/nonexistent.qcow2"], "vm: Could not open '/nonexistent.qcow2'"),
        ("bad drive option", ["--kernel", "@kernel", "--drive", "file=x,cache=none"], "unknown drive option 'cache'"),
        ("bad memory", ["--kernel", "@kernel", "--memory", "12Q"], "invalid memory size"),
        ("too little memory for the kernel", ["--kernel", "@big", "--memory", "16M"], "does not fit"),
        ("unknown machine", ["--machine", "pc", "--kernel", "@kernel"], "unknown machine 'pc'"),
    ])
    func startupErrorsAreClearAndQuick(_ name: String, _ args: [String], _ message: String) async throws {
        guard VMTool.path != nil else { Issue.record("vm not built"); return }
        let k = file("k.Image", TinyKernel.shutdown)
        let g = file("garbage", Array("this is not an initramfs\n".utf8))
        let big = file("big.Image", LoaderTests.header(imageSize: 64 << 20) + [UInt8](repeating: 0, count: 4096))
        let text = file("notes.txt", Array(String(repeating: "not a kernel\n", count: 100).utf8))
        let a = args.map { $0 == "@kernel" ? k : $0 == "@garbage" ? g : $0 == "@big" ? big : $0 == "@text" ? text : $0 }
        let r = try await VMTool.run(a, timeout: 30)
        #expect(!r.timedOut, "\(name): \(r)")
        #expect(r.status != 0, "\(name): \(r)")
        #expect(r.stderr.contains(message), "\(name): \(r)")
        #expect(r.stdout.isEmpty, "\(name): \(r)")
    }
}
