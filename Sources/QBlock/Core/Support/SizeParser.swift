/// Parses sizes as qemu-img does: a number with an optional suffix
/// (b, k/K, M, G, T, P, E — powers of 1024; a bare number is bytes).
public enum SizeParser {
    /// Parses `text` (for example `64k`, `1G`, `512`) into bytes.
    /// - Returns: the size in bytes, or `nil` for an unknown suffix, a negative number or an
    ///   overflow (qemu-img then reports an invalid size).
    public static func parse(_ text: String) -> Int64? {
        var s = Substring(text.trimmingCharacters(in: " "))
        guard !s.isEmpty else { return nil }
        var mult: Double = 1
        if let last = s.last, last.isLetter {
            switch last {
            case "b", "B": mult = 1
            case "k", "K": mult = 1024
            case "m", "M": mult = 1024 * 1024
            case "g", "G": mult = 1024 * 1024 * 1024
            case "t", "T": mult = 1024 * 1024 * 1024 * 1024
            case "p", "P": mult = 1024 * 1024 * 1024 * 1024 * 1024
            case "e", "E": mult = 1024 * 1024 * 1024 * 1024 * 1024 * 1024
            default: return nil
            }
            s = s.dropLast()
        }
        guard !s.isEmpty, let v = Double(s), v >= 0, v.isFinite else { return nil }
        let r = v * mult
        guard r < 9.2e18, r == r.rounded() || mult > 1 else { return nil }
        if mult == 1 && Int64(exactly: v) == nil { return nil }
        return Int64(r.rounded(.down))
    }
}

extension String {
    func trimmingCharacters(in set: Character) -> String {
        var s = Substring(self)
        while s.first == set { s = s.dropFirst() }
        while s.last == set { s = s.dropLast() }
        return String(s)
    }
}
