#if canImport(Glibc)
import Glibc
#endif
import Foundation

/// Numbers as QEMU's command-line tools read and print them: qemu-io's `cvtnum`
/// (QEMU's `qemu_strtosz`: "64k", "1.5M", "0x200") and `cvtstr` ("64 KiB", "1.500 KiB").
package enum QemuNumbers {
    /// Why a size did not parse; `message(for:)` words it as qemu-io does.
    package enum ParseError: Error, Equatable, Sendable {
        /// Not a number, or an unknown suffix (qemu-io: -EINVAL).
        case invalid
        /// Does not fit in 63 bits (qemu-io: -ERANGE).
        case tooLarge
    }

    private static func suffixMultiplier(_ c: UInt8?) -> UInt64? {
        guard let c else { return nil }
        switch c {
        case UInt8(ascii: "B"), UInt8(ascii: "b"): return 1
        case UInt8(ascii: "K"), UInt8(ascii: "k"): return 1 << 10
        case UInt8(ascii: "M"), UInt8(ascii: "m"): return 1 << 20
        case UInt8(ascii: "G"), UInt8(ascii: "g"): return 1 << 30
        case UInt8(ascii: "T"), UInt8(ascii: "t"): return 1 << 40
        case UInt8(ascii: "P"), UInt8(ascii: "p"): return 1 << 50
        case UInt8(ascii: "E"), UInt8(ascii: "e"): return 1 << 60
        default: return nil
        }
    }

    private static func isDigit(_ c: UInt8) -> Bool { c >= 48 && c <= 57 }
    private static func hexValue(_ c: UInt8) -> UInt64? {
        switch c {
        case 48...57: return UInt64(c - 48)
        case 97...102: return UInt64(c - 87)
        case 65...70: return UInt64(c - 55)
        default: return nil
        }
    }

    /// Parses `text` exactly as qemu-io's `cvtnum` does: a decimal number with an optional
    /// fraction and a binary suffix (B, K, M, G, T, P, E; bytes by default), or a hexadecimal
    /// number (QEMU 7.2 still accepts a suffix after it, with a deprecation warning passed to
    /// `warning`). The result is at most `Int64.max`.
    package static func parseSize(_ text: String, warning: ((String) -> Void)? = nil) -> Result<Int64, ParseError> {
        let b = Array(text.utf8)
        func at(_ i: Int) -> UInt8? { i < b.count ? b[i] : nil }
        var i = 0
        while let c = at(i), c == 32 || (c >= 9 && c <= 13) { i += 1 }
        var negative = false
        if let c = at(i), c == UInt8(ascii: "+") || c == UInt8(ascii: "-") {
            negative = c == UInt8(ascii: "-")
            i += 1
        }
        let signEnd = i
        var value: UInt64 = 0
        var overflow = false
        while let c = at(i), isDigit(c) {
            let (m, o1) = value.multipliedReportingOverflow(by: 10)
            let (s, o2) = m.addingReportingOverflow(UInt64(c - 48))
            overflow = overflow || o1 || o2
            value = s
            i += 1
        }
        if i == signEnd { return .failure(.invalid) }
        if overflow { return .failure(i == b.count ? .tooLarge : .invalid) }
        if negative { return .failure(.invalid) }
        var fraction: UInt64 = 0
        var hex = false
        if value == 0, let c = at(i), c == UInt8(ascii: "x") || c == UInt8(ascii: "X") {
            // Hexadecimal: strtoull(base 16) from the sign, with an optional 0x prefix.
            var j = signEnd
            if at(j) == UInt8(ascii: "0"), let x = at(j + 1), x == UInt8(ascii: "x") || x == UInt8(ascii: "X"),
               let h = at(j + 2), hexValue(h) != nil {
                j += 2
            }
            value = 0
            while let c = at(j), let h = hexValue(c) {
                if value > UInt64.max >> 4 { overflow = true }
                value = value &<< 4 | h
                j += 1
            }
            if overflow { return .failure(j == b.count ? .tooLarge : .invalid) }
            if at(j) == UInt8(ascii: ".") { return .failure(.invalid) }
            hex = true
            i = j
        } else if at(i) == UInt8(ascii: ".") {
            var j = i + 1
            while let c = at(j), isDigit(c) { j += 1 }
            if j == i + 1 {
                i += 1 // strtod found no number: skip the dot ("1.k" is 1k)
            } else {
                if let e = at(j), e == UInt8(ascii: "e") || e == UInt8(ascii: "E") {
                    var k = j + 1
                    if let s = at(k), s == UInt8(ascii: "+") || s == UInt8(ascii: "-") { k += 1 }
                    if let d = at(k), isDigit(d) { return .failure(.invalid) }
                }
                let digits = String(decoding: b[i..<j], as: UTF8.self)
                let f = Double("0" + digits) ?? 0
                let scaled = f * 0x1p64
                fraction = scaled >= 0x1p64 ? UInt64.max : UInt64(scaled)
                i = j
            }
        }
        var multiplier: UInt64 = 1
        if let m = suffixMultiplier(at(i)) {
            if hex { warning?("Using a multiplier suffix on hex numbers is deprecated: \(text)") }
            multiplier = m
            i += 1
        }
        if multiplier == 1 {
            if fraction != 0 { return .failure(.invalid) }
        } else {
            // 64.64 fixed point times the multiplier, rounding half up.
            let (hi, lo) = value.multipliedFullWidth(by: multiplier)
            let (fhi, flo) = fraction.multipliedFullWidth(by: multiplier)
            var high = hi
            var (v, carry) = lo.addingReportingOverflow(fhi)
            if carry { high &+= 1 }
            (v, carry) = v.addingReportingOverflow(flo >> 63)
            if carry { high &+= 1 }
            if high != 0 { return .failure(i == b.count ? .tooLarge : .invalid) }
            value = v
        }
        if i != b.count { return .failure(.invalid) }
        if value > UInt64(Int64.max) { return .failure(.tooLarge) }
        return .success(Int64(value))
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
