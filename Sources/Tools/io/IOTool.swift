import ArgumentParser
import QBlock
import ToolSupport

/// How `io` reports errors: "io: message", as qemu-io's `error_report`.
let tool = ToolProgram.invoked(as: "io", helpHint: { "Try '\($0) --help' for more information." })

/// `io`: exercises the I/O path of a disk image, with the commands and output of qemu-io.
@main
struct IOTool: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "io",
        abstract: "Disk exerciser: runs qemu-io commands on an image.",
        discussion: "Without -c, commands are read from standard input after a 'qemu-io> ' prompt. Type 'help' for the list.")

    @Option(name: [.customShort("c"), .customLong("cmd")], help: "Execute command with its arguments (repeatable, run in order).")
    var commands: [String] = []

    @Option(name: [.customShort("f"), .customLong("format")], help: "Image format (raw, qcow2); probed if not given.")
    var format: String?

    @Flag(name: [.customShort("r"), .customLong("read-only")], help: "Open the image read-only.")
    var readOnly = false

    @Option(name: [.customShort("t"), .customLong("cache")], help: "Cache mode: none, writeback, writethrough, directsync, unsafe.")
    var cache: String?

    @Flag(name: [.customShort("n"), .customLong("nocache")], help: "Disable the host cache (same as -t none).")
    var noCache = false

    @Flag(name: [.customShort("U"), .customLong("force-share")], help: "Force shared permissions (only with -r).")
    var forceShare = false

    @Flag(name: [.customShort("s"), .customLong("snapshot")], help: "Use a temporary snapshot: writes go to a temporary overlay, the image is not changed.")
    var snapshot = false

    @Flag(name: [.customShort("C"), .customLong("copy-on-read")], help: "Copy data read from the backing chain into the image.")
    var copyOnRead = false

    @Option(name: [.customShort("d"), .customLong("discard")], help: "Discard mode: ignore (off) or unmap (on, the default).")
    var discard: String?

    @Option(name: [.customShort("i"), .customLong("aio")], help: "How requests reach the host: threads, native (needs -t none) or io_uring.")
    var aio: String?

    @Flag(name: [.customShort("k"), .customLong("native-aio")], help: "Same as --aio native.")
    var nativeAIO = false

    @Flag(name: [.customShort("m"), .customLong("misalign")], help: "Misalign request buffers by 16 bytes in memory (tests bounce buffering).")
    var misalign = false

    @Flag(name: .customLong("image-opts"), help: "The file argument is an option string (driver=qcow2,file.filename=...).")
    var imageOpts = false

    @Option(name: .customLong("object"), help: "Create a user object (secret,id=ID,data=...); repeatable.")
    var objects: [String] = []

    @Argument(help: "The image to open.")
    var file: String?

    static func main() async {
        await tool.main(IOTool.self, usageErrors: .wholeMessage)
    }

    func run() async throws {
        throw ExitCode(await execute())
    }

    /// Opens the image, runs the commands, and returns the exit status.
    func execute() async -> Int32 {
        do {
            _ = try ImageSpec.objects(objects)
        } catch {
            tool.printError(error.asBlockError.message)
            return 1
        }
        if format != nil && imageOpts {
            tool.printError("--image-opts and -f are mutually exclusive")
            return 1
        }
        // (qemu-io's default cache mode is writethrough: every write is durable when it completes.)
        var options = OpenOptions(format: format, readOnly: readOnly, cache: .writethrough, forceShare: forceShare)
        options.snapshot = snapshot
        options.copyOnRead = copyOnRead
        var unmap = true
        if let discard {
            guard let u = QemuIOSession.unmap(discardMode: discard) else {
                tool.printError("Invalid discard option: \(discard)")
                return 1
            }
            unmap = u
        }
        if nativeAIO { options.aio = .native }
        if let aio {
            guard let mode = AIOMode(qemuName: aio) else {
                tool.printError("Invalid aio option: \(aio)")
                return 1
            }
            options.aio = mode
        }
        if noCache { options.cache = .none }
        if let cache {
            guard let mode = CacheMode(qemuName: cache) else {
                tool.printError("Invalid cache option: \(cache)")
                return 1
            }
            options.cache = mode
        }
        let session = QemuIOSession(output: .standardStreams, programName: tool.name, misalign: misalign)
        await session.setImageOpts(imageOpts)
        if let file {
            var opened: Bool
            if imageOpts {
                do {
                    // (qemu-io names no option implicitly: a bare word is a flag.)
                    let drive = try DriveOptions.parse(file, warning: ImageSpec.printWarning(tool))
                    opened = await session.open(nil, options: options, unmap: unmap, driveOptions: drive)
                } catch {
                    tool.printError("\(QMPError.from(error).desc)")
                    opened = false
                }
            } else {
                opened = await session.open(file, options: options, unmap: unmap)
            }
            if !opened { return 1 }
        }
        let ok = commands.isEmpty ? await interactive(session) : await run(commands, in: session)
        await session.close()
        return ok ? 0 : 1
    }

    /// Runs the `-c` commands in order until `quit`; false if any failed.
    func run(_ commands: [String], in session: QemuIOSession) async -> Bool {
        var ok = true
        for c in commands {
            if await session.quitRequested { break }
            if await !session.execute(c) { ok = false }
        }
        return ok
    }

    /// Reads commands from standard input after a `qemu-io> ` prompt until `quit` or end of input.
    func interactive(_ session: QemuIOSession) async -> Bool {
        var ok = true
        while await !session.quitRequested {
            writeStdout("qemu-io> ")
            flushStdout()
            // readLine blocks: run it on an I/O pool thread, never on the cooperative pool.
            guard let line = await IOThreadPool.shared.run({ readLine(strippingNewline: true) }) else { break }
            if await !session.execute(line) { ok = false }
        }
        return ok
    }
}
