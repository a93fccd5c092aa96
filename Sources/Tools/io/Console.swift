#if canImport(Glibc)
import Glibc
#endif
import QBlock
import ToolSupport

/// Where the tool prints: stdout for results (buffered, like qemu-io's printf) and
/// stderr for diagnostics. Each call writes its text with one stdio call, so lines from
/// concurrently completing aio requests never interleave.
enum Console {
    static let programName = "io"

    static func out(_ text: String) { StandardStream.output.write(text) }

    /// A diagnostic line as-is ("Try 'io --help' ...").
    static func err(_ text: String) { StandardStream.error.write(text + "\n") }

    /// A diagnostic line prefixed with the program name, as QEMU's `error_report`.
    static func report(_ text: String) { StandardStream.error.write("\(programName): \(text)\n") }

    static func flush() { StandardStream.output.flush() }

    /// The session's sink: its text goes to stdout and stderr unchanged.
    static let output = QemuIOOutput(standardOutput: { StandardStream.output.write($0) },
                                     standardError: { StandardStream.error.write($0) })
}
