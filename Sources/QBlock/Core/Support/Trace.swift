#if canImport(Glibc)
import Glibc
#endif

/// Timing lines on standard error when `QBLOCK_QMP_TRACE` is set (for the pause benchmark).
package enum Trace {
    package static let enabled = getenv("QBLOCK_QMP_TRACE") != nil

    package static func now() -> Int64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Int64(ts.tv_sec) * 1_000_000 + Int64(ts.tv_nsec) / 1000
    }

    package static func log(_ s: @autoclosure () -> String) {
        guard enabled else { return }
        var line = s() + "\n"
        line.withUTF8 { b in _ = write(2, b.baseAddress, b.count) }
    }
}
