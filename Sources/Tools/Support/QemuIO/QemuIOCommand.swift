import QBlock
/// One qemu-io command: its names, usage line, argument limits and handler.
struct QemuIOCommand: Sendable {
    let name: String
    var altName: String? = nil
    /// The usage arguments as qemu-io prints them (nil: none, not even the space).
    let args: String?
    let oneline: String
    var help: String? = nil
    let argMin: Int
    /// -1: no limit.
    let argMax: Int
    /// False for commands that work without an open image (open, help, quit).
    var needsFile = true
    /// True for commands that need write permission (qemu-io's `perm`).
    var needsWrite = false
    let run: @Sendable (QemuIOSession, [String]) async -> Bool

    var usage: String { line(as: name) }

    /// The one-line help, naming the command as `name`.
    func line(as name: String) -> String {
        args.map { "\(name) \($0) -- \(oneline)" } ?? "\(name) -- \(oneline)"
    }
}

extension QemuIOSession {
    /// The commands, sorted by name as qemu-io's table is.
    static let commands: [QemuIOCommand] = [
        QemuIOCommand(name: "abort", args: nil, oneline: "simulate a program crash using abort(3)",
                      argMin: 0, argMax: 0, needsFile: false) { s, _ in await s.crash() },
        QemuIOCommand(name: "aio_flush", args: nil, oneline: "completes all outstanding aio requests",
                      argMin: 0, argMax: 0) { s, _ in await s.waitForRequests(); return true },
        QemuIOCommand(name: "aio_read", args: "[-Ciqv] [-P pattern] off len [len..]",
                      oneline: "asynchronously reads a number of bytes", help: QemuIOHelp.aioRead,
                      argMin: 2, argMax: -1) { s, a in await s.aioRead(a) },
        QemuIOCommand(name: "aio_write", args: "[-Cfiquz] [-P pattern] off len [len..]",
                      oneline: "asynchronously writes a number of bytes", help: QemuIOHelp.aioWrite,
                      argMin: 2, argMax: -1, needsWrite: true) { s, a in await s.aioWrite(a) },
        QemuIOCommand(name: "alloc", args: "offset [count]", oneline: "checks if offset is allocated in the file",
                      argMin: 1, argMax: 2) { s, a in await s.alloc(a) },
        QemuIOCommand(name: "break", args: "event tag", oneline: "sets a breakpoint on event and tags the stopped request as tag",
                      argMin: 2, argMax: 2) { s, a in await s.breakCommand(a) },
        QemuIOCommand(name: "close", altName: "c", args: nil, oneline: "close the current open file",
                      argMin: 0, argMax: 0) { s, _ in await s.close(); return true },
        QemuIOCommand(name: "discard", altName: "d", args: "[-Cq] off len",
                      oneline: "discards a number of bytes at a specified offset", help: QemuIOHelp.discard,
                      argMin: 2, argMax: -1, needsWrite: true) { s, a in await s.discard(a) },
        QemuIOCommand(name: "flush", altName: "f", args: nil, oneline: "flush all in-core file state to disk",
                      argMin: 0, argMax: 0) { s, _ in await s.flush() },
        QemuIOCommand(name: "help", altName: "?", args: "[command]", oneline: "help for one or all commands",
                      argMin: 0, argMax: 1, needsFile: false) { s, a in await s.help(a) },
        QemuIOCommand(name: "info", altName: "i", args: nil, oneline: "prints information about the current file",
                      argMin: 0, argMax: 0) { s, _ in await s.info() },
        QemuIOCommand(name: "length", altName: "l", args: nil, oneline: "gets the length of the current file",
                      argMin: 0, argMax: 0) { s, _ in await s.length() },
        QemuIOCommand(name: "map", args: "", oneline: "prints the allocated areas of a file",
                      argMin: 0, argMax: 0) { s, _ in await s.map() },
        QemuIOCommand(name: "open", altName: "o", args: "[-rsCnkU] [-t cache] [-d discard] [-o options] [path]",
                      oneline: "open the file specified by path", help: QemuIOHelp.open,
                      argMin: 1, argMax: -1, needsFile: false) { s, a in await s.openCommand(a) },
        QemuIOCommand(name: "quit", altName: "q", args: nil, oneline: "exit the program",
                      argMin: 0, argMax: -1, needsFile: false) { s, _ in await s.requestQuit(); return true },
        QemuIOCommand(name: "read", altName: "r", args: "[-abCqv] [-P pattern [-s off] [-l len]] off len",
                      oneline: "reads a number of bytes at a specified offset", help: QemuIOHelp.read,
                      argMin: 2, argMax: -1) { s, a in await s.read(a) },
        QemuIOCommand(name: "readv", args: "[-Cqv] [-P pattern] off len [len..]",
                      oneline: "reads a number of bytes at a specified offset", help: QemuIOHelp.readv,
                      argMin: 2, argMax: -1) { s, a in await s.readv(a) },
        QemuIOCommand(name: "remove_break", args: "tag", oneline: "remove a breakpoint by tag",
                      argMin: 1, argMax: 1) { s, a in await s.removeBreakCommand(a) },
        QemuIOCommand(name: "reopen", args: "[(-r|-w)] [-c cache] [-o options]",
                      oneline: "reopens an image with new options", help: QemuIOHelp.reopen,
                      argMin: 0, argMax: -1) { s, a in await s.reopen(a) },
        QemuIOCommand(name: "resume", args: "tag", oneline: "resumes the request tagged as tag",
                      argMin: 1, argMax: 1) { s, a in await s.resumeCommand(a) },
        QemuIOCommand(name: "sigraise", args: "signal", oneline: "raises a signal", help: QemuIOHelp.sigraise,
                      argMin: 1, argMax: 1, needsFile: false) { s, a in await s.sigraise(a) },
        QemuIOCommand(name: "truncate", altName: "t", args: "[-m prealloc_mode] off",
                      oneline: "truncates the current file at the given offset",
                      argMin: 1, argMax: 3, needsWrite: true) { s, a in await s.truncate(a) },
        QemuIOCommand(name: "wait_break", args: "tag", oneline: "waits for the suspension of a request",
                      argMin: 1, argMax: 1) { s, a in await s.waitBreakCommand(a) },
        QemuIOCommand(name: "write", altName: "w", args: "[-bcCfnquz] [-P pattern | -s source_file] off len",
                      oneline: "writes a number of bytes at a specified offset", help: QemuIOHelp.write,
                      argMin: 2, argMax: -1, needsWrite: true) { s, a in await s.write(a) },
        QemuIOCommand(name: "writev", args: "[-Cfq] [-P pattern] off len [len..]",
                      oneline: "writes a number of bytes at a specified offset", help: QemuIOHelp.writev,
                      argMin: 2, argMax: -1, needsWrite: true) { s, a in await s.writev(a) },
    ]

    static func findCommand(_ name: String) -> QemuIOCommand? {
        commands.first { $0.name == name || $0.altName == name }
    }

    /// `help` and `help CMD`.
    func help(_ argv: [String]) -> Bool {
        guard argv.count > 1 else {
            var text = ""
            for c in Self.commands { text += c.usage + "\n" }
            out(text + "\nUse 'help commandname' for extended help.\n")
            return true
        }
        guard let c = Self.findCommand(argv[1]) else {
            out("command \(argv[1]) not found\n")
            return false
        }
        out(c.line(as: argv[1]) + "\n" + (c.help ?? ""))
        return true
    }

    /// Prints a command's usage line (on stdout, as qemu-io) and fails.
    func usage(_ name: String) -> Bool {
        if let c = Self.findCommand(name) { out(c.usage + "\n") }
        return false
    }
}
