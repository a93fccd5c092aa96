#if canImport(Glibc)
import Glibc
#endif
import QBlock

/// Where the tool prints: stdout for results (buffered, like qemu-io's printf) and
/// stderr for diagnostics. Each call writes its text with one stdio call, so lines from
/// concurrently completing aio requests never interleave.
enum Console {
    static let programName = "io"

    static func out(_ text: String) { fputs(text, stdout) }

    /// A diagnostic line as-is ("Try 'io --help' ...").
    static func err(_ text: String) { fputs(text + "\n", stderr) }

    /// A diagnostic line prefixed with the program name, as QEMU's `error_report`.
    static func report(_ text: String) { fputs("\(programName): \(text)\n", stderr) }

    static func flush() { fflush(stdout) }

    /// The session's sink: its text goes to stdout and stderr unchanged.
    static let output = QemuIOOutput(standardOutput: { fputs($0, stdout) },
                                     standardError: { fputs($0, stderr) })
}
