import QBlock
#if canImport(Glibc)
import Glibc
#endif

/// Where a ``QemuIOSession`` prints.
///
/// qemu-io prints command results on standard output and diagnostics on standard error;
/// a session hands each piece of text to the matching closure. Every call carries whole
/// lines (or the whole output of one command), so a sink that writes each call with one
/// write keeps lines from concurrently completing `aio_read`/`aio_write` requests apart.
/// The closures may be called from any task, also after ``QemuIOSession/execute(_:)``
/// returned (asynchronous requests report when they complete).
public struct QemuIOOutput: Sendable {
    /// Receives result text (qemu-io's `printf`), newlines included.
    public var standardOutput: @Sendable (String) -> Void
    /// Receives diagnostic text (qemu-io's `error_report` and the like), newlines included.
    public var standardError: @Sendable (String) -> Void

    /// - Parameters:
    ///   - standardOutput: receives result text.
    ///   - standardError: receives diagnostic text.
    public init(standardOutput: @escaping @Sendable (String) -> Void,
                standardError: @escaping @Sendable (String) -> Void) {
        self.standardOutput = standardOutput
        self.standardError = standardError
    }

    /// The process's standard output and error (C's buffered `stdout`, unbuffered `stderr`),
    /// each call written with one stdio call.
    package static let standardStreams = QemuIOOutput(standardOutput: { writeStdout($0) },
                                                      standardError: { writeStderr($0) })
}

/// A qemu-io command interpreter: the open image, the asynchronous requests in flight, and
/// the commands of qemu-io (`read`, `write`, `aio_read`, `map`, `open`, `help`, ...) with
/// their options, messages and output format.
///
/// Commands run one at a time: issue the next ``execute(_:)`` after the previous one
/// returned, as qemu-io's prompt and QEMU's `human-monitor-command "qemu-io ..."` do.
/// Asynchronous requests (`aio_read`, `aio_write`) run in the background until `aio_flush`,
/// `truncate` or ``close()`` waits for them.
///
/// ```swift
/// let session = QemuIOSession(output: QemuIOOutput(
///     standardOutput: { print($0, terminator: "") },
///     standardError: { print($0, terminator: "") }))
/// if await session.open("disk.qcow2", options: OpenOptions(format: "qcow2")) {
///     _ = await session.execute("write -P 0xab 0 64k")
///     _ = await session.execute("read -v 0 512")
/// }
/// await session.close()
/// ```
public actor QemuIOSession {
    /// The sink for all text the session prints.
    public nonisolated let output: QemuIOOutput
    /// The name that prefixes diagnostics ("qemu-io: can't open device ...").
    public nonisolated let programName: String

    var node: (any BlockDriver)?
    /// The options the image was opened (or last reopened) with, dotted keys: what
    /// `reopen` keeps and compares against.
    var openedOptions = QObject.Dict()
    /// Whether discard requests reach the image (qemu-io's `-d unmap`, the default); false
    /// (`-d ignore`) makes them succeed without effect, as QEMU's nodes opened without
    /// `BDRV_O_UNMAP` do.
    var unmap = true
    /// qemu-io's `--image-opts`: the `open` command's path operand is an option string
    /// (and `open -o` is refused).
    public var imageOpts = false

    /// Sets ``imageOpts``.
    public func setImageOpts(_ on: Bool) { imageOpts = on }

    /// True once `quit` ran: the caller should stop reading commands.
    public private(set) var quitRequested = false
    private var pending: [Task<Void, Never>] = []

    /// Creates a session with no image open.
    /// - Parameters:
    ///   - output: where results and diagnostics go.
    ///   - programName: the prefix of diagnostic lines, as QEMU's `error_report` prints it.
    ///   - misalign: shift request buffers 16 bytes off their alignment (qemu-io's `--misalign`).
    public init(output: QemuIOOutput, programName: String = "qemu-io", misalign: Bool = false) {
        self.output = output
        self.programName = programName
        self.misalignment = misalign ? 16 : 0
    }

    /// How many bytes request buffers start past an aligned address (16 with `--misalign`).
    nonisolated let misalignment: Int

    /// True while an image is open.
    public var isImageOpen: Bool { node != nil }

    // MARK: Printing

    /// Result text on the output sink's standard output.
    nonisolated func out(_ text: String) { output.standardOutput(text) }

    /// A diagnostic line as-is ("no file open, try 'help open'").
    nonisolated func err(_ text: String) { output.standardError(text + "\n") }

    /// A diagnostic line prefixed with the program name, as QEMU's `error_report`.
    nonisolated func report(_ text: String) { output.standardError("\(programName): \(text)\n") }

    // MARK: Running commands

    /// Runs one command line: words separated by spaces, the command name first.
    ///
    /// Unknown commands, wrong argument counts, a missing image and write commands on a
    /// read-only image are reported as qemu-io reports them. An empty line does nothing.
    /// - Parameter line: the command and its arguments, e.g. `"read -P 0xab 0 4k"`.
    /// - Returns: false if the command failed (qemu-io then exits with status 1).
    public func execute(_ line: String) async -> Bool {
        let argv = line.split(separator: " ", omittingEmptySubsequences: true).map(String.init)
        guard let name = argv.first else { return true }
        guard let cmd = Self.findCommand(name) else {
            err("command \"\(name)\" not found")
            return false
        }
        if cmd.needsFile && node == nil {
            err("no file open, try 'help open'")
            return false
        }
        let n = argv.count - 1
        if n < cmd.argMin || (cmd.argMax != -1 && n > cmd.argMax) {
            if cmd.argMax == -1 {
                err("bad argument count \(n) to \(name), expected at least \(cmd.argMin) arguments")
            } else if cmd.argMin == cmd.argMax {
                err("bad argument count \(n) to \(name), expected \(cmd.argMin) arguments")
            } else {
                err("bad argument count \(n) to \(name), expected between \(cmd.argMin) and \(cmd.argMax) arguments")
            }
            return false
        }
        if cmd.needsWrite, let node, node.isReadOnly {
            report("Block node is read-only")
            return false
        }
        return await cmd.run(self, argv)
    }

    /// `quit`: marks the session as finished.
    func requestQuit() { quitRequested = true }

    // MARK: Asynchronous requests

    /// Starts `body` in the background; `aio_flush` waits for it.
    func startAIO(_ body: @escaping @Sendable () async -> Void) {
        pending.append(Task { await body() })
    }

    /// Waits for every asynchronous request started so far (`aio_flush`).
    public func waitForRequests() async {
        let tasks = pending
        pending.removeAll()
        for t in tasks { await t.value }
    }

    // MARK: Opening and closing

    /// Opens `path` as the current image, as qemu-io's command line and `open` command do.
    ///
    /// Failures are printed ("can't open device ...", "file open already ..."), as is the
    /// warning about a raw image whose format was probed.
    /// - Parameters:
    ///   - path: the image file.
    ///   - options: format, read-only, cache mode and force-share.
    ///   - unmap: whether discard requests reach the image (`-d unmap`; false: `-d ignore`).
    /// - Returns: false after printing why the image could not be opened.
    public func open(_ path: String, options: OpenOptions, unmap: Bool = true) async -> Bool {
        await open(path as String?, options: options, unmap: unmap, driveOptions: nil)
    }

    /// Opens an image named by a file name (plain or `json:{...}`), by `-drive` style
    /// options, or both, as qemu-io's `open -o OPTIONS [path]` and `--image-opts OPTIONS` do
    /// (``DriveOpener``; options are dotted keys with string values, as
    /// ``DriveOptions/parse(_:impliedKey:keepID:warning:)`` gives them).
    ///
    /// Failures are printed as qemu-io prints them ("can't open device PATH: …", or "can't
    /// open: …" without a path).
    /// - Parameters:
    ///   - path: the image file, or nil when `driveOptions` name it.
    ///   - options: the open mode (format, read-only, cache mode, force-share, …).
    ///   - unmap: whether discard requests reach the image.
    ///   - driveOptions: the options, or nil for none.
    /// - Returns: false after printing why the image could not be opened.
    public func open(_ path: String?, options: OpenOptions, unmap: Bool = true, driveOptions: QObject.Dict?) async -> Bool {
        let device = path.map { " device \($0)" } ?? ""
        if node != nil {
            report("file open already, try 'help close'")
            return false
        }
        if options.forceShare, let given = driveOptions?["force-share"], given != .string("on") {
            report("-U conflicts with image options")
            return false
        }
        if options.forceShare && !options.readOnly {
            report("can't open\(device): force-share=on can only be used with read-only images")
            return false
        }
        // (Options and json: names go to DriveOpener, which knows every driver.)
        let byOptions = driveOptions != nil || path.map(DriveOptions.isJSONFilename) ?? true
        if let f = options.format, !byOptions, !ImageOpener.formats.contains(f) {
            report("can't open\(device): Unknown driver '\(f)'")
            return false
        }
        openedOptions = QObject.Dict()
        if let f = options.format { openedOptions["driver"] = .string(f) }
        guard let path, driveOptions == nil, !DriveOptions.isJSONFilename(path) else {
            do {
                for (k, v) in DriveOptions.flatten(driveOptions ?? QObject.Dict()).entries where options.format == nil || k != "driver" {
                    openedOptions[k] = v
                }
                if let path, DriveOptions.isJSONFilename(path) {
                    for (k, v) in try DriveOptions.parseJSONFilename(path).entries where openedOptions[k] == nil { openedOptions[k] = v }
                }
                node = try await DriveOpener.open(filename: path, options: driveOptions ?? QObject.Dict(), defaults: options)
            } catch {
                report("can't open\(device): \(error.asDriveMessage)")
                return false
            }
            if options.format == nil && driveOptions?["driver"] == nil, let path, !DriveOptions.isJSONFilename(path),
               node?.driverName == "raw", !options.readOnly, !options.snapshot {
                output.standardError(ToolProgram.rawProbeWarning(path))
            }
            self.unmap = unmap
            return true
        }
        let probedRaw = options.format == nil && (try? ImageOpener.probe(path)) == "raw"
        do {
            node = try await ImageOpener.open(path, options: options)
        } catch {
            let e = error.asBlockError
            // (qemu-io prints a format driver's message as it is; qemu-img's "Could not open
            // 'X': " prefix appears only where the file itself failed to open.)
            report("can't open device \(path): \((ImageOpener.formatDriverError(e, filename: path) ?? e).message)")
            return false
        }
        if probedRaw && !options.readOnly && !options.snapshot {
            output.standardError(ToolProgram.rawProbeWarning(path))
        }
        self.unmap = unmap
        return true
    }

    /// qemu-io's `-d` values: `unmap`/`on` pass discards to the image (true), `ignore`/`off`
    /// drop them (false); nil for anything else (QEMU's `bdrv_parse_discard_flags`).
    public static func unmap(discardMode: String) -> Bool? {
        switch discardMode {
        case "unmap", "on": return true
        case "ignore", "off": return false
        default: return nil
        }
    }

    /// Waits for outstanding requests and closes the image, if one is open (the `close`
    /// command). A failure to close is printed.
    public func close() async {
        await waitForRequests()
        guard let n = node else { return }
        node = nil
        do {
            try await n.close()
        } catch {
            report("Failed to close image: \(error.asBlockError.message)")
        }
    }

    // MARK: Argument helpers

    /// Parses a number as qemu-io's `cvtnum`, printing qemu-io's message if it is not one.
    func number(_ text: String) -> Int64? {
        switch QemuNumbers.parseSize(text, warning: { self.report("warning: " + $0) }) {
        case .success(let v): return v
        case .failure(let e):
            out(QemuNumbers.message(for: e, argument: text) + "\n")
            return nil
        }
    }

    /// Parses a pattern byte, printing qemu-io's message if it is not one.
    func patternByte(_ text: String) -> UInt8? {
        guard let p = Pattern.parseByte(text) else {
            out("\(text) is not a valid pattern byte\n")
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
                out("Argument '\(arg)' exceeds maximum size \(BlockRequestLimits.maxBytes)\n")
                return nil
            }
            if count > BlockRequestLimits.maxBytes - len {
                out("The total number of bytes exceed the maximum size \(BlockRequestLimits.maxBytes)\n")
                return nil
            }
            count += len
        }
        return count
    }
}

extension Error {
    /// The message of an error from ``DriveOpener``: a monitor error's description or a
    /// block error's message.
    var asDriveMessage: String {
        if let e = self as? QMPError { return e.desc }
        return asBlockError.message
    }
}
