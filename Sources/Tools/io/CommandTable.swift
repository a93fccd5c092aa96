/// One qemu-io command: its names, usage line, argument limits and handler.
struct IOCommand {
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
    let run: (IOSession, [String]) async -> Bool

    var usage: String { line(as: name) }

    /// The one-line help, naming the command as `name`.
    func line(as name: String) -> String {
        args.map { "\(name) \($0) -- \(oneline)" } ?? "\(name) -- \(oneline)"
    }
}

extension IOSession {
    /// The commands, sorted by name as qemu-io's table is.
    static let commands: [IOCommand] = [
        IOCommand(name: "aio_flush", args: nil, oneline: "completes all outstanding aio requests",
                  argMin: 0, argMax: 0) { s, _ in await s.drainAIO(); return true },
        IOCommand(name: "aio_read", args: "[-Ciqv] [-P pattern] off len [len..]",
                  oneline: "asynchronously reads a number of bytes", help: HelpText.aioRead,
                  argMin: 2, argMax: -1) { s, a in s.aioRead(a) },
        IOCommand(name: "aio_write", args: "[-Cfiquz] [-P pattern] off len [len..]",
                  oneline: "asynchronously writes a number of bytes", help: HelpText.aioWrite,
                  argMin: 2, argMax: -1, needsWrite: true) { s, a in s.aioWrite(a) },
        IOCommand(name: "alloc", args: "offset [count]", oneline: "checks if offset is allocated in the file",
                  argMin: 1, argMax: 2) { s, a in await s.alloc(a) },
        IOCommand(name: "close", altName: "c", args: nil, oneline: "close the current open file",
                  argMin: 0, argMax: 0) { s, _ in await s.closeImage(); return true },
        IOCommand(name: "discard", altName: "d", args: "[-Cq] off len",
                  oneline: "discards a number of bytes at a specified offset", help: HelpText.discard,
                  argMin: 2, argMax: -1, needsWrite: true) { s, a in await s.discard(a) },
        IOCommand(name: "flush", altName: "f", args: nil, oneline: "flush all in-core file state to disk",
                  argMin: 0, argMax: 0) { s, _ in await s.flush() },
        IOCommand(name: "help", altName: "?", args: "[command]", oneline: "help for one or all commands",
                  argMin: 0, argMax: 1, needsFile: false) { s, a in s.help(a) },
        IOCommand(name: "info", altName: "i", args: nil, oneline: "prints information about the current file",
                  argMin: 0, argMax: 0) { s, _ in s.info() },
        IOCommand(name: "length", altName: "l", args: nil, oneline: "gets the length of the current file",
                  argMin: 0, argMax: 0) { s, _ in s.length() },
        IOCommand(name: "map", args: "", oneline: "prints the allocated areas of a file",
                  argMin: 0, argMax: 0) { s, _ in await s.map() },
        IOCommand(name: "open", altName: "o", args: "[-rnU] [-t cache] [-f fmt] [-o options] path",
                  oneline: "open the file specified by path", help: HelpText.open,
                  argMin: 1, argMax: -1, needsFile: false) { s, a in await s.openCommand(a) },
        IOCommand(name: "quit", altName: "q", args: nil, oneline: "exit the program",
                  argMin: 0, argMax: -1, needsFile: false) { s, _ in s.quit = true; return true },
        IOCommand(name: "read", altName: "r", args: "[-abCqv] [-P pattern [-s off] [-l len]] off len",
                  oneline: "reads a number of bytes at a specified offset", help: HelpText.read,
                  argMin: 2, argMax: -1) { s, a in await s.read(a) },
        IOCommand(name: "readv", args: "[-Cqv] [-P pattern] off len [len..]",
                  oneline: "reads a number of bytes at a specified offset", help: HelpText.readv,
                  argMin: 2, argMax: -1) { s, a in await s.readv(a) },
        IOCommand(name: "truncate", altName: "t", args: "[-m prealloc_mode] off",
                  oneline: "truncates the current file at the given offset",
                  argMin: 1, argMax: 3, needsWrite: true) { s, a in await s.truncate(a) },
        IOCommand(name: "write", altName: "w", args: "[-bcCfnquz] [-P pattern | -s source_file] off len",
                  oneline: "writes a number of bytes at a specified offset", help: HelpText.write,
                  argMin: 2, argMax: -1, needsWrite: true) { s, a in await s.write(a) },
        IOCommand(name: "writev", args: "[-Cfq] [-P pattern] off len [len..]",
                  oneline: "writes a number of bytes at a specified offset", help: HelpText.writev,
                  argMin: 2, argMax: -1, needsWrite: true) { s, a in await s.writev(a) },
    ]

    static func findCommand(_ name: String) -> IOCommand? {
        commands.first { $0.name == name || $0.altName == name }
    }

    /// `help` and `help CMD`.
    func help(_ argv: [String]) -> Bool {
        guard argv.count > 1 else {
            var text = ""
            for c in Self.commands { text += c.usage + "\n" }
            Console.out(text + "\nUse 'help commandname' for extended help.\n")
            return true
        }
        guard let c = Self.findCommand(argv[1]) else {
            Console.out("command \(argv[1]) not found\n")
            return false
        }
        Console.out(c.line(as: argv[1]) + "\n" + (c.help ?? ""))
        return true
    }

    /// Prints a command's usage line (on stdout, as qemu-io) and fails.
    func usage(_ name: String) -> Bool {
        if let c = Self.findCommand(name) { Console.out(c.usage + "\n") }
        return false
    }
}
