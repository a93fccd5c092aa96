/// Sizes as QEMU's tools read them: QEMU's `qemu_strtosz` ("64k", "1.5M", "0x200"), which
/// every size argument goes through — qemu-img's `cvtnum` (`create` and `resize` sizes, `dd`
/// operands, `map` offsets, …), its `-o` sizes (`parse_option_size`) and qemu-io's `cvtnum`.
/// The tools differ only in the range they accept and in how they word a failure, so this is
/// the one parser, and each caller checks the range and words the message:
///
/// - ``strtosz(_:warning:)``: the whole syntax, values up to `UInt64.max`;
/// - ``cvtnum(_:warning:)``: the tools' `cvtnum`, values up to `Int64.max` (qemu-io);
/// - ``parse(_:)``: the same syntax below ``imgLimit``, as an optional, for the qemu-img
///   callers, which word every failure alike.
public enum SizeParser {
    /// Why a size did not parse.
    public enum Failure: Error, Equatable, Sendable {
        /// Not a number, or an unknown suffix, or something after it (QEMU's -EINVAL).
        case invalid
        /// Out of range (QEMU's -ERANGE).
        case tooLarge
    }

    /// Parses `text` exactly as QEMU 7.2's `qemu_strtosz` does: optional leading blanks and
    /// `+`, a decimal number with an optional fraction and an optional binary suffix (B, K,
    /// M, G, T, P, E in either case; bytes by default; a fraction needs a suffix other than
    /// B; the product rounded half up), or a hexadecimal number (`0x200`; QEMU 7.2 still takes
    /// a suffix after it, with a deprecation warning passed to `warning`). Nothing may follow:
    /// no trailing blanks, no exponent.
    /// - Returns: the value (at most `UInt64.max`), `.tooLarge` when it does not fit, else `.invalid`.
    public static func strtosz(_ text: String, warning: ((String) -> Void)? = nil) -> Result<UInt64, Failure> {
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
        return .success(value)
    }

    /// Parses `text` as qemu-io's and qemu-img's `cvtnum` do: ``strtosz(_:warning:)``, and
    /// `.tooLarge` for a value beyond `Int64.max`.
    public static func cvtnum(_ text: String, warning: ((String) -> Void)? = nil) -> Result<Int64, Failure> {
        strtosz(text, warning: warning).flatMap { $0 > UInt64(Int64.max) ? .failure(.tooLarge) : .success(Int64($0)) }
    }

    /// The bound ``parse(_:)`` puts on sizes: they must be below 9.2 × 10^18, a little under
    /// `Int64.max`. qemu-img takes sizes up to `Int64.max` (its `-o` sizes up to `UInt64.max`)
    /// and fails later, in the driver, for those it cannot use ("offset(…) exceeds
    /// maximum(…)", "Image size cannot be negative"); the callers here round, add and grow
    /// tables without those checks, so they refuse such sizes when parsing, with their
    /// invalid-size message, as they always have. qemu-io's ``cvtnum(_:warning:)`` has no bound.
    public static let imgLimit: Int64 = 9_200_000_000_000_000_000

    /// Parses `text` (for example `64k`, `1G`, `512`) with QEMU's syntax
    /// (``cvtnum(_:warning:)``), below ``imgLimit``, for a qemu-img caller that words every
    /// failure alike (`cvtnum`'s "Invalid size specified. You may use k, M, G, T, P or E
    /// suffixes for…", `-o`'s "expects a non-negative number below 2^64"). The deprecation
    /// warning for a suffix after a hexadecimal number is not printed.
    /// - Returns: the size in bytes, or nil when it does not parse or is not below ``imgLimit``.
    public static func parse(_ text: String) -> Int64? {
        guard let v = try? cvtnum(text).get(), v < imgLimit else { return nil }
        return v
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
}
