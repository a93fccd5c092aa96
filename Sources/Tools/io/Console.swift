#if canImport(Glibc)
import Glibc
#endif
import Foundation
import QBlock

/// Where the tool prints: stdout for results (buffered, like qemu-io's printf) and
/// stderr for diagnostics. Each call writes its text with one stdio call, so lines from
/// concurrently completing aio requests never interleave.
enum Console {
    static let programName = "io"

    static func out(_ text: String) { fputs(text, stdout) }

    /// A diagnostic line as-is ("no file open, try 'help open'").
    static func err(_ text: String) { fputs(text + "\n", stderr) }

    /// A diagnostic line prefixed with the program name, as QEMU's `error_report`.
    static func report(_ text: String) { fputs("\(programName): \(text)\n", stderr) }

    static func flush() { fflush(stdout) }
}

/// Elapsed time of one request and qemu-io's two report lines (`print_report`).
struct IOReport {
    let seconds: Int64
    let nanoseconds: Int64

    init(since start: ContinuousClock.Instant) {
        let d = start.duration(to: .now).components
        seconds = d.seconds
        nanoseconds = d.attoseconds / 1_000_000_000
    }

    private var total: Double { Double(seconds) + Double(nanoseconds) / 1e9 }

    func lines(_ op: String, offset: Int64, count: Int64, total bytes: Int64, ops: Int = 1, machine: Bool) -> String {
        let ts = QemuNumbers.formatTime(seconds: seconds, nanoseconds: nanoseconds, verbose: machine)
        let t = total
        if machine {
            return "\(bytes),\(ops),\(ts),\(String(format: "%.3f", Double(bytes) / t)),\(String(format: "%.3f", Double(ops) / t))\n"
        }
        return "\(op) \(bytes)/\(count) bytes at offset \(offset)\n"
            + "\(QemuNumbers.formatSize(Double(bytes))), \(ops) ops; \(ts) "
            + "(\(QemuNumbers.formatSize(Double(bytes) / t))/sec and \(String(format: "%.4f", Double(ops) / t)) ops/sec)\n"
    }
}

extension BlockError {
    /// The `strerror` text qemu-io prints after "read failed: " and the like.
    var errnoText: String { BlockError.strerror(errnoValue) }
}
