import ArgumentParser
import QBlock
#if canImport(Glibc)
import Glibc
#endif

/// One of the command-line tools (`img`, `io`, `nbd`, `vm`) and the way QEMU's tools report
/// what goes wrong: "NAME: message" on standard error (QEMU's `error_report`), an exit
/// status, and after a usage error a pointer to `--help`.
///
/// A tool keeps one, `let tool = ToolProgram(name: "img")`, and throws what its methods
/// return (`throw tool.fail("...")`); ``main(_:arguments:usageErrors:errorMessage:)`` runs the
/// command and turns what it throws into the exit status.
package struct ToolProgram: Sendable {
    /// The name that prefixes diagnostics ("img: Could not open ...").
    package let name: String
    /// The line printed after a usage error ("Try 'img --help' for more information").
    package let helpHint: String

    /// A tool called `name`.
    /// - Parameter helpHint: the line after a usage error, without the newline; by default
    ///   qemu-img's "Try 'NAME --help' for more information" (qemu-io ends it with a period).
    package init(name: String, helpHint: String? = nil) {
        self.name = name
        self.helpHint = helpHint ?? "Try '\(name) --help' for more information"
    }

    /// The tool as it was invoked: QEMU's tools name themselves after the last component of
    /// `argv[0]` (`error_set_progname`), so a link called `qemu-img` prints "qemu-img: ..."
    /// and QEMU's test suite's expected outputs apply unchanged. `defaultName` when the
    /// process has no usable `argv[0]`.
    /// - Parameter helpHint: as in ``init(name:helpHint:)``, given the name.
    package static func invoked(as defaultName: String, helpHint: ((String) -> String)? = nil) -> ToolProgram {
        let invoked = CommandLine.arguments.first.map { $0.split(separator: "/").last.map(String.init) ?? "" } ?? ""
        let name = invoked.isEmpty ? defaultName : invoked
        return ToolProgram(name: name, helpHint: helpHint?(name))
    }

    /// Prints "NAME: message" on standard error, as QEMU's `error_report` does (what standard
    /// output holds is written first, so that the two keep their order).
    package func printError(_ message: String) {
        flushStdout()
        writeStderr("\(name): \(message)\n")
    }

    /// Reports `message` and returns the exit status `code`, for `throw tool.fail(...)`.
    package func fail(_ message: String, code: Int32 = 1) -> ExitCode {
        printError(message)
        return ExitCode(code)
    }

    /// Reports each line of `message` as an error line of its own ("NAME: line"), as qemu-img
    /// reports an error and its hints, and returns exit status 1.
    package func failEachLine(_ message: String) -> ExitCode {
        for line in message.split(separator: "\n", omittingEmptySubsequences: false) { printError(String(line)) }
        return ExitCode.failure
    }

    /// Reports `message` and exits with status 1 at once.
    package func exitWithError(_ message: String) -> Never {
        printError(message)
        flushStdout()
        Glibc.exit(1)
    }

    /// A usage error as qemu-img's `error_exit` reports it: the message, the pointer to
    /// `--help`, exit status 1.
    package func usageError(_ message: String) -> ExitCode {
        printError(message)
        writeStderr(helpHint + "\n")
        return ExitCode.failure
    }

    /// The "You may use k, M, G..." error qemu-img's `cvtnum` prints for a bad number.
    /// - Parameter what: what the number is ("image size", "offset").
    package func invalidNumber(_ what: String) -> ExitCode {
        printError("Invalid \(what) specified. You may use k, M, G, T, P or E suffixes for")
        return fail("kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.")
    }

    /// Parses a size argument as qemu-img's `cvtnum` does.
    /// - Throws: ``invalidNumber(_:)``'s exit status after printing its message.
    package func parseSize(_ text: String, what: String) throws -> Int64 {
        guard let v = SizeParser.parse(text) else { throw invalidNumber(what) }
        return v
    }

    /// QEMU's warning (at every open) for an image whose bitmaps were invalidated by a
    /// program without bitmap support; like QEMU's, its last line has no newline.
    package func warnAboutStaleBitmaps(_ node: any BlockDriver) {
        guard let warning = (node as? any PersistentBitmapStore)?.staleBitmapsWarning else { return }
        writeStderr("\(name): warning: \(warning)")
    }

    /// The warning QEMU prints when it opens `filename` for writing as raw because probing
    /// said so, newline-terminated.
    package static func rawProbeWarning(_ filename: String) -> String {
        "WARNING: Image format was not specified for '\(filename)' and probing guessed raw.\n"
            + "         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n"
            + "         Specify the 'raw' format explicitly to remove the restrictions.\n"
    }

    /// qemu-img's message for an image that did not open: "Could not open 'X': <why>", where
    /// a <why> from the file layer itself starts with "Could not open 'X': " again.
    package static func openErrorMessage(_ e: BlockError, _ filename: String) -> String {
        let prefix = "Could not open '\(filename)': "
        if e.message.hasPrefix(prefix) && e.errno != nil && e.operation == "open" { return prefix + e.message }
        return e.message.hasPrefix("Could not open") ? e.message : prefix + e.message
    }
}
