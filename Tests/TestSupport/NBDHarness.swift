import Foundation
import Testing
import QBlock

/// Starting and stopping NBD servers (ours and qemu-nbd) for the interop tests.
public enum NBDHarness {
    public static let haveClients = Tools.which("nbdinfo") != nil && Tools.which("nbdcopy") != nil
    public static let haveQemu = Tools.qemuAvailable && Tools.which("qemu-nbd") != nil
    public static let ready = haveClients && haveQemu && Tools.executable("nbd") != nil
    public static let missing = "needs nbdinfo/nbdcopy (libnbd-bin), qemu-nbd/qemu-io/qemu-img (qemu-utils) and the built nbd tool; skipped"

    /// A server process started with --fork (both tools return once the socket listens).
    public struct Server {
        public let pid: pid_t
        public let socket: String
        /// Our own child (reaped with waitpid) rather than a daemon.
        public let child: Bool
        public var uri: String { "nbd+unix:///?socket=\(socket)" }
        public func uri(_ name: String) -> String { "nbd+unix:///\(name)?socket=\(socket)" }

        /// SIGTERM, then waits (at most 10 s) for the process to be gone.
        public func stop() {
            kill(pid, SIGTERM)
            if child { _ = NBDHarness.reap(pid) } else { NBDHarness.waitGone(pid) }
        }
    }

    /// posix_spawn with standard output and error appended to `output`, a clean signal
    /// mask and default dispositions (a test thread may block signals, and a child inherits
    /// that). Foundation's Process is avoided: a daemonizing child confuses its reaping.
    public static func spawn(_ argv: [String], output: String) -> pid_t? {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, output, O_WRONLY | O_CREAT | O_APPEND, 0o644)
        posix_spawn_file_actions_adddup2(&actions, 1, 2)
        var attr = posix_spawnattr_t()
        posix_spawnattr_init(&attr)
        defer { posix_spawnattr_destroy(&attr) }
        var empty = sigset_t()
        sigemptyset(&empty)
        var defaults = sigset_t()
        sigemptyset(&defaults)
        for sig in [SIGTERM, SIGINT, SIGHUP, SIGPIPE] { sigaddset(&defaults, sig) }
        posix_spawnattr_setsigmask(&attr, &empty)
        posix_spawnattr_setsigdefault(&attr, &defaults)
        posix_spawnattr_setflags(&attr, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))
        var cargs = argv.map { strdup($0) } + [nil]
        defer { for a in cargs { free(a) } }
        var pid: pid_t = 0
        guard posix_spawn(&pid, argv[0], &actions, &attr, &cargs, environ) == 0 else { return nil }
        return pid
    }

    /// The exit status of a child (waits for it).
    public static func reap(_ pid: pid_t) -> Int32 {
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        return (status & 0x7f) == 0 ? (status >> 8) & 0xff : -1
    }

    public static func waitGone(_ pid: pid_t) {
        let deadline = Date().addingTimeInterval(10)
        while Date() < deadline {
            if kill(pid, 0) != 0 { return }
            // A daemon whose parent is gone may linger as a zombie where nobody reaps it.
            // (/proc files report size 0, so they are read with read(2) rather than Foundation.)
            let fd = open("/proc/\(pid)/stat", O_RDONLY)
            if fd >= 0 {
                var buf = [UInt8](repeating: 0, count: 512)
                let n = read(fd, &buf, buf.count)
                close(fd)
                let stat = String(decoding: buf.prefix(max(0, n)), as: UTF8.self)
                if let close = stat.lastIndex(of: ")"), stat.distance(from: close, to: stat.endIndex) > 2,
                   stat[stat.index(close, offsetBy: 2)] == "Z" { return }
            }
            usleep(20_000)
        }
    }

    /// Starts `nbd` (ours, with --fork and --pid-file: it returns once listening) or
    /// `qemu-nbd` (in the foreground as our child: qemu-nbd 7.2's --fork writes the pid of
    /// the parent that exits into the pid file) on a Unix socket in `dir`.
    public static func start(_ tool: String, _ args: [String], image: String, dir: TempDir, tag: String) throws -> Server {
        let socket = dir.file("\(tag).sock"), pidFile = dir.file("\(tag).pid"), log = dir.file("\(tag).log")
        if tool == "nbd" {
            let argv = [Tools.executable("nbd") ?? "nbd", "--fork", "--pid-file", pidFile, "-k", socket] + args + [image]
            let status = spawn(argv, output: log).map(reap) ?? -1
            let output = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
            guard status == 0, let text = try? String(contentsOfFile: pidFile, encoding: .utf8),
                  let pid = pid_t(text.trimmingCharacters(in: .whitespacesAndNewlines)) else {
                throw NBDStartFailed(description: "nbd \(args.joined(separator: " ")) did not start: \(output)")
            }
            return Server(pid: pid, socket: socket, child: false)
        }
        guard let pid = spawn([Tools.which(tool) ?? tool, "-k", socket] + args + [image], output: log) else {
            throw NBDStartFailed(description: "\(tool) could not be started")
        }
        let deadline = Date().addingTimeInterval(10)
        while !FileManager.default.fileExists(atPath: socket) {
            var status: Int32 = 0
            if waitpid(pid, &status, WNOHANG) == pid || Date() > deadline {
                kill(pid, SIGKILL)
                _ = waitpid(pid, &status, WNOHANG)
                let output = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
                throw NBDStartFailed(description: "\(tool) \(args.joined(separator: " ")) did not start: \(output)")
            }
            usleep(10_000)
        }
        usleep(50_000)  // the socket file exists just before listen()
        return Server(pid: pid, socket: socket, child: true)
    }

    /// Runs `body` against a server, stopping it afterwards whatever happens.
    @discardableResult
    public static func with<T>(_ tool: String, _ args: [String], image: String, dir: TempDir, tag: String,
                        _ body: (Server) throws -> T) throws -> T {
        let s = try start(tool, args, image: image, dir: dir, tag: tag)
        defer { s.stop() }
        return try body(s)
    }

    /// A qcow2 image of 8 MiB with data, zeros and holes over a backing file.
    public static func chain(_ dir: TempDir) throws -> String {
        let base = dir.file("base.qcow2"), top = dir.file("top.qcow2")
        try mustRun("qemu-img", "create", "-q", "-f", "qcow2", base, "8M")
        try mustRun("qemu-io", "-f", "qcow2", "-c", "write -P 3 0 2M", "-c", "write -P 4 6M 512k", base)
        try mustRun("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top, cwd: dir.path)
        try mustRun("qemu-io", "-f", "qcow2", "-c", "write -P 1 1M 64k", "-c", "write -z 4M 1M", "-c", "write -P 2 7M 4k",
                    "-c", "write -z 6M 64k", top)
        return top
    }
}
