import ArgumentParser
import QBlock
#if canImport(Glibc)
import Glibc
#endif

extension ToolProgram {
    /// How ``main(_:arguments:usageErrors:errorMessage:)`` reports a command line that
    /// ArgumentParser rejects (or a `ValidationError`).
    package enum UsageErrors: Sendable {
        /// As qemu-img and qemu-nbd: "NAME: " and the first line of the error, then the
        /// ``ToolProgram/helpHint``.
        case firstLine
        /// As qemu-io: "NAME: " and the whole error message, then the ``ToolProgram/helpHint``.
        case wholeMessage
        /// ArgumentParser's own report (the error and the usage) and exit status.
        case argumentParser
    }

    /// The tools' shared `main`: parses the command line into `command` (or one of its
    /// subcommands), runs it, and exits.
    ///
    /// - An `ExitCode` thrown by the command is the exit status (its message, if any, was
    ///   printed by ``fail(_:code:)`` and the like).
    /// - An error that `errorMessage` describes is printed as "NAME: message", status 1.
    /// - `--help` and `--version` print on standard output, status 0.
    /// - Any other error is a usage error, reported as `usageErrors` says.
    /// - The block layer's notices (``BlockNotices``) are printed on stderr as they come.
    /// - Parameters:
    ///   - arguments: the arguments without the program name; nil for the process's own.
    ///   - errorMessage: the message for errors the tool reports itself (by default a
    ///     ``BlockError``'s message); nil for the others.
    package func main<Command: ParsableCommand>(
        _ command: Command.Type, arguments: [String]? = nil, usageErrors: UsageErrors = .firstLine,
        errorMessage: @Sendable (any Error) -> String? = { ($0 as? BlockError)?.message }
    ) async -> Never {
        DriveOpener.installJSONFilenames()
        // The drivers' notices ("qcow2: Marking image as corrupt: …", repair lines) go to
        // stderr as QEMU's drivers print them.
        BlockNotices.install(BlockNotices.standardError)
        do {
            var parsed = try command.parseAsRoot(arguments)
            if var asyncCommand = parsed as? AsyncParsableCommand {
                try await asyncCommand.run()
            } else {
                try parsed.run()
            }
        } catch let code as ExitCode {
            Glibc.exit(code.rawValue)
        } catch {
            if let message = errorMessage(error) { exitWithError(message) }
            if command.exitCode(for: error) == .success { command.exit(withError: error) }
            let message: String
            switch usageErrors {
            case .argumentParser:
                command.exit(withError: error)
            case .wholeMessage:
                message = command.message(for: error)
            case .firstLine:
                let full = command.fullMessage(for: error).split(separator: "\n").first.map(String.init) ?? "\(error)"
                message = full.hasPrefix("Error: ") ? String(full.dropFirst(7)) : full
            }
            printError(message)
            writeStderr(helpHint + "\n")
            Glibc.exit(1)
        }
        Glibc.exit(0)
    }
}
