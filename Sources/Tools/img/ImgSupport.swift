import ArgumentParser
import QBlock
import ToolSupport
#if canImport(Glibc)
import Glibc
#endif

/// Writes to standard error unbuffered.
func writeStderr(_ s: String) {
    StandardStream.error.write(s)
}

/// Writes to standard output (buffered; flushed at exit).
func writeStdout(_ s: String) {
    StandardStream.output.write(s)
}

/// Prints "img: message" on stderr, as qemu-img's error_report does.
func printError(_ message: String) {
    StandardStream.output.flush()
    writeStderr("img: \(message)\n")
}

/// Reports `message` and returns the failure exit code, for `throw fail(...)`.
func fail(_ message: String, code: Int32 = 1) -> ExitCode {
    printError(message)
    return ExitCode(code)
}

/// A usage error as qemu-img's error_exit reports it: the message and a pointer to --help.
func usageError(_ message: String) -> ExitCode {
    printError(message)
    writeStderr("Try 'img --help' for more information\n")
    return ExitCode.failure
}

/// The "You may use k, M, G..." error qemu-img's cvtnum prints for a bad number.
func invalidNumber(_ what: String) -> ExitCode {
    printError("Invalid \(what) specified. You may use k, M, G, T, P or E suffixes for")
    return fail("kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.")
}

/// Parses a size argument as qemu-img's cvtnum does.
func parseSize(_ text: String, what: String) throws -> Int64 {
    guard let v = SizeParser.parse(text) else { throw invalidNumber(what) }
    return v
}

/// Options most subcommands share.
struct ImageOptions: ParsableArguments {
    @Option(name: .customShort("f"), help: "Image format (raw, qcow2); probed when omitted.")
    var format: String?

    @Flag(name: [.customShort("U"), .customLong("force-share")], help: "Open the image shared with other writers.")
    var forceShare = false

    /// Opens `filename` for reading (or writing), reporting failures as qemu-img does.
    func open(_ filename: String, readOnly: Bool = true, openBacking: Bool = true,
              cache: CacheMode = .writeback, forRepair: Bool = false) async throws -> any BlockDriver {
        if forceShare && !readOnly {
            throw fail("force-share=on can only be used with read-only images")
        }
        if let format, !ImageOpener.formats.contains(format) {
            throw fail("Unknown file format '\(format)'")
        }
        let options = OpenOptions(format: format, readOnly: readOnly, cache: cache, forceShare: forceShare,
                                  openBacking: openBacking, allowCorrupt: forRepair, forRepair: forRepair)
        do {
            let node = try await ImageOpener.open(filename, options: options)
            warnAboutStaleBitmaps(node, tool: "img")
            if format == nil && node.driverName == "raw" && !readOnly {
                writeStderr("WARNING: Image format was not specified for '\(filename)' and probing guessed raw.\n"
                    + "         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n"
                    + "         Specify the 'raw' format explicitly to remove the restrictions.\n")
            }
            return node
        } catch let e as BlockError {
            throw fail(openErrorMessage(e, filename))
        }
    }
}

/// QEMU's warning (at every open) for an image whose bitmaps were invalidated by a program
/// without bitmap support; like QEMU's, its last line has no newline.
func warnAboutStaleBitmaps(_ node: any BlockDriver, tool: String) {
    guard let warning = (node as? any PersistentBitmapStore)?.staleBitmapsWarning else { return }
    writeStderr("\(tool): warning: \(warning)")
}

/// qemu-img reports "Could not open 'X': <why>", where <why> from the file layer itself
/// starts with "Could not open 'X': " again.
func openErrorMessage(_ e: BlockError, _ filename: String) -> String {
    let prefix = "Could not open '\(filename)': "
    if e.message.hasPrefix(prefix) && e.errno != nil && e.operation == "open" { return prefix + e.message }
    return e.message.hasPrefix("Could not open") ? e.message : prefix + e.message
}

/// `--output=human|json`.
struct OutputOption: ParsableArguments {
    @Option(name: .customLong("output"), help: "Output format: human or json.")
    var output = "human"

    var isJSON: Bool {
        get throws {
            switch output {
            case "human": return false
            case "json": return true
            default: throw fail("--output must be used with human or json as argument.")
            }
        }
    }
}

/// Closes a node, ignoring errors (qemu-img does not report them either).
func closeQuietly(_ node: any BlockDriver) async {
    try? await node.close()
}

/// qemu-img's `-p` progress line: "    (12.34/100%)" rewritten in place.
@Sendable func printProgress(_ value: Double) {
    writeStdout("    (\(percentText(value))/100%)\r")
    flushStdout()
}

/// A percentage as C's "%3.2f" prints it.
func percentText(_ value: Double) -> String {
    let hundredths = Int((value * 100).rounded())
    let frac = hundredths % 100
    return "\(hundredths / 100)." + (frac < 10 ? "0" : "") + "\(frac)"
}

func flushStdout() { StandardStream.output.flush() }
