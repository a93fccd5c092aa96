import QBlock
import Foundation

/// Elapsed time of one request and qemu-io's two report lines (`print_report`).
struct QemuIOReport {
    let seconds: Int64
    let nanoseconds: Int64

    init(since start: ContinuousClock.Instant) {
        let d = start.duration(to: .now).components
        seconds = d.seconds
        nanoseconds = d.attoseconds / 1_000_000_000
    }

    /// Runs `body` and measures how long it took.
    static func timing<T: Sendable>(_ body: @Sendable () async -> T) async -> (T, QemuIOReport) {
        let start = ContinuousClock.now
        let value = await body()
        return (value, QemuIOReport(since: start))
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
