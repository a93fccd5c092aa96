#if canImport(Glibc)
import Glibc
#endif
import QBlock

/// The state of one io run: the open image, outstanding aio requests, and whether to quit.
/// Commands run one at a time on the main task; aio requests run as child tasks that only
/// read `node` and print.
final class IOSession: @unchecked Sendable {
    var node: (any BlockDriver)?
    var quit = false
    private var pending: [Task<Void, Never>] = []

    // MARK: Running commands

    /// Runs one command line (words separated by spaces); false if it failed.
    func execute(_ line: String) async -> Bool {
        let argv = line.split(separator: " ", omittingEmptySubsequences: true).map(String.init)
        guard let name = argv.first else { return true }
        guard let cmd = Self.findCommand(name) else {
            Console.err("command \"\(name)\" not found")
            return false
        }
        if cmd.needsFile && node == nil {
            Console.err("no file open, try 'help open'")
            return false
        }
        let n = argv.count - 1
        if n < cmd.argMin || (cmd.argMax != -1 && n > cmd.argMax) {
            if cmd.argMax == -1 {
                Console.err("bad argument count \(n) to \(name), expected at least \(cmd.argMin) arguments")
            } else if cmd.argMin == cmd.argMax {
                Console.err("bad argument count \(n) to \(name), expected \(cmd.argMin) arguments")
            } else {
                Console.err("bad argument count \(n) to \(name), expected between \(cmd.argMin) and \(cmd.argMax) arguments")
            }
            return false
        }
        if cmd.needsWrite, let node, node.isReadOnly {
            Console.report("Block node is read-only")
            return false
        }
        return await cmd.run(self, argv)
    }

    /// Runs the `-c` commands in order; false if any failed.
    func run(_ commands: [String]) async -> Bool {
        var ok = true
        for c in commands where !quit {
            if await !execute(c) { ok = false }
        }
        return ok
    }

    /// Reads commands from standard input after a `qemu-io> ` prompt until `quit` or end of input.
    func interactive() async -> Bool {
        var ok = true
        while !quit {
            Console.out("qemu-io> ")
            Console.flush()
            // readLine blocks: run it on an I/O pool thread, never on the cooperative pool.
            guard let line = await IOThreadPool.shared.run({ readLine(strippingNewline: true) }) else { break }
            if await !execute(line) { ok = false }
        }
        return ok
    }

    // MARK: Asynchronous requests

    /// Starts `body` in the background; `aio_flush` waits for it.
    func startAIO(_ body: @escaping @Sendable () async -> Void) {
        pending.append(Task { await body() })
    }

    func drainAIO() async {
        let tasks = pending
        pending.removeAll()
        for t in tasks { await t.value }
    }

    // MARK: Opening and closing

    /// Opens `path` as the current image (qemu-io's `openfile`); false after printing why not.
    func openImage(_ path: String, options: OpenOptions) async -> Bool {
        if node != nil {
            Console.report("file open already, try 'help close'")
            return false
        }
        if options.forceShare && !options.readOnly {
            Console.report("can't open device \(path): force-share=on can only be used with read-only images")
            return false
        }
        if let f = options.format, !ImageOpener.formats.contains(f) {
            Console.report("can't open device \(path): Unknown driver '\(f)'")
            return false
        }
        let probedRaw = options.format == nil && (try? ImageOpener.probe(path)) == "raw"
        do {
            node = try await ImageOpener.open(path, options: options)
        } catch {
            Console.report("can't open device \(path): \(error.asBlockError.message)")
            return false
        }
        if probedRaw && !options.readOnly {
            Console.err("""
                WARNING: Image format was not specified for '\(path)' and probing guessed raw.
                         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.
                         Specify the 'raw' format explicitly to remove the restrictions.
                """)
        }
        return true
    }

    /// Waits for outstanding requests and closes the image, if one is open.
    func closeImage() async {
        await drainAIO()
        guard let n = node else { return }
        node = nil
        do {
            try await n.close()
        } catch {
            Console.report("Failed to close image: \(error.asBlockError.message)")
        }
    }

    // MARK: Argument helpers

    /// Parses a number as qemu-io's `cvtnum`, printing qemu-io's message if it is not one.
    func number(_ text: String) -> Int64? {
        switch QemuNumbers.parseSize(text, warning: { Console.report("warning: " + $0) }) {
        case .success(let v): return v
        case .failure(let e):
            Console.out(QemuNumbers.message(for: e, argument: text) + "\n")
            return nil
        }
    }

    /// Parses a pattern byte, printing qemu-io's message if it is not one.
    func patternByte(_ text: String) -> UInt8? {
        guard let p = Pattern.parseByte(text) else {
            Console.out("\(text) is not a valid pattern byte\n")
            return nil
        }
        return p
    }

    /// Parses the lengths of a vectored request (qemu-io's `create_iovec`) into their total.
    func vectorLength(_ args: [String]) -> Int64? {
        var count: Int64 = 0
        for arg in args {
            guard let len = number(arg) else { return nil }
            if len > BlockRequestLimits.maxBytes {
                Console.out("Argument '\(arg)' exceeds maximum size \(BlockRequestLimits.maxBytes)\n")
                return nil
            }
            if count > BlockRequestLimits.maxBytes - len {
                Console.out("The total number of bytes exceed the maximum size \(BlockRequestLimits.maxBytes)\n")
                return nil
            }
            count += len
        }
        return count
    }
}
