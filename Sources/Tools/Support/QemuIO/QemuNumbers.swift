#if canImport(Glibc)
import Glibc
#endif
import Foundation
import QBlock

/// Numbers as QEMU's command-line tools read and print them: qemu-io's `cvtnum`
/// (``SizeParser``, QEMU's `qemu_strtosz`: "64k", "1.5M", "0x200") and `cvtstr` ("64 KiB",
/// "1.500 KiB").
package enum QemuNumbers {
    /// Why a size did not parse; `message(for:)` words it as qemu-io does.
    package typealias ParseError = SizeParser.Failure

    /// Parses `text` exactly as qemu-io's `cvtnum` does (``SizeParser/cvtnum(_:warning:)``):
    /// at most `Int64.max`; QEMU 7.2's deprecation warning for a suffix after a hexadecimal
    /// number is passed to `warning`.
    package static func parseSize(_ text: String, warning: ((String) -> Void)? = nil) -> Result<Int64, ParseError> {
        SizeParser.cvtnum(text, warning: warning)
    }

    /// qemu-io's message for a number that did not parse (`print_cvtnum_err`).
    package static func message(for error: ParseError, argument: String) -> String {
        switch error {
        case .invalid: return "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- \(argument)"
        case .tooLarge: return "Parsing error: argument too large -- \(argument)"
        }
    }

    /// Formats a byte count or rate as qemu-io's `cvtstr` does: "512 bytes", "64 KiB", "1.500 KiB".
    package static func formatSize(_ value: Double) -> String {
        let units: [(Double, String)] = [
            (0x1p60, " EiB"), (0x1p50, " PiB"), (0x1p40, " TiB"), (0x1p30, " GiB"), (0x1p20, " MiB"), (0x1p10, " KiB"),
        ]
        var str = String(format: "%f", value)
        var suffix = " bytes"
        for (unit, name) in units where value >= unit {
            str = String(format: "%.3f", value / unit)
            suffix = name
            break
        }
        if let r = str.range(of: ".000") {
            return String(str[..<r.lowerBound]) + suffix
        }
        return str + suffix
    }

    /// Formats an elapsed time as qemu-io's `timestr`: "00.00 sec", or "0:00:00.00" when
    /// `verbose` (the machine-readable -C form) or when the time reaches a second.
    package static func formatTime(seconds: Int64, nanoseconds: Int64, verbose: Bool) -> String {
        let frac = Double(nanoseconds) / 1e9
        let secs = Double(seconds % 60) + frac
        if verbose || seconds > 0 {
            return String(format: "%u:%02u:%05.2f", UInt32(truncatingIfNeeded: seconds / 3600),
                          UInt32(truncatingIfNeeded: (seconds % 3600) / 60), secs)
        }
        return String(format: "%05.2f sec", frac)
    }
}
