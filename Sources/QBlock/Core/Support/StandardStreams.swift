#if canImport(Glibc)
import Glibc
#endif
import CSupport

/// The process's standard output and error as the C library's buffered streams, for tools
/// that must print exactly what QEMU's tools print and in the same order.
///
/// Swift 6 does not let code read the C globals `stdout` and `stderr` (shared mutable state);
/// these go through the same `FILE *` objects, so text written here and by any other stdio
/// call keeps its order. Each ``write(_:)`` is one stdio call, so lines written from several
/// threads never interleave within a call.
public enum StandardStream: Sendable {
    /// Standard output (buffered).
    case output
    /// Standard error (unbuffered by the C library).
    case error

    private var file: UnsafeMutablePointer<FILE> {
        switch self {
        case .output: return qb_stdout()
        case .error: return qb_stderr()
        }
    }

    /// Writes `text` as UTF-8 bytes, unchanged.
    public func write(_ text: String) {
        var s = text
        s.withUTF8 { b in _ = fwrite(b.baseAddress, 1, b.count, file) }
    }

    /// Writes the buffered bytes to the file descriptor.
    public func flush() { fflush(file) }
}
