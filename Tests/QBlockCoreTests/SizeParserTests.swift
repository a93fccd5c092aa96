import Testing
@testable import QBlockCore

/// The one size parser (QEMU's `qemu_strtosz`) and the ranges its callers put on it:
/// `strtosz` up to 2^64 - 1, `cvtnum` (qemu-io, qemu-img) up to 2^63 - 1, `parse` (the
/// qemu-img callers here) below ``SizeParser/imgLimit``.
@Suite struct SizeParserTests {
    @Test(arguments: [
        ("0", UInt64(0)), ("512", 512), ("64k", 65536), ("64K", 65536), ("1M", 1 << 20), ("1.5k", 1536), ("0x200", 512),
        ("1b", 1), ("1B", 1), ("010", 10), ("1.k", 1024), ("+5", 5), (" 5", 5), ("\t5", 5), ("0.0001k", 0),
        ("0.0005k", 1), ("1.25k", 1280), ("7E", 7 << 60), ("0x10k", 16384), ("0X10", 16), ("1.0", 1),
        ("9007199254740993", 9_007_199_254_740_993), ("18446744073709551615", UInt64.max), ("15.99E", 18_435_214_858_663_483_136),
    ])
    func strtoszParses(_ text: String, _ value: UInt64) {
        #expect(SizeParser.strtosz(text) == .success(value))
    }

    /// What the earlier qemu-img parser (a `Double` with a suffix) took and `qemu-img` refuses.
    @Test(arguments: ["", "abc", "k", "1.5", "0.5", "1k5", "1e3", "1e2k", "1.5e3k", ".5k", "5 ", "0x", "-1", "0x1.5",
                      "0x1p4", "1x", "1kk", "inf", "nan", "1_000"])
    func strtoszRejects(_ text: String) {
        #expect(SizeParser.strtosz(text) == .failure(.invalid))
        #expect(SizeParser.parse(text) == nil)
    }

    @Test(arguments: ["16E", "99999999999999999999", "18446744073709551616", "0x10000000000000000"])
    func strtoszOutOfRange(_ text: String) {
        #expect(SizeParser.strtosz(text) == .failure(.tooLarge))
    }

    @Test func rangesOfTheCallers() {
        #expect(SizeParser.cvtnum("9223372036854775807") == .success(Int64.max))
        #expect(SizeParser.cvtnum("9223372036854775808") == .failure(.tooLarge))
        #expect(SizeParser.cvtnum("8E") == .failure(.tooLarge))
        #expect(SizeParser.cvtnum("18446744073709551615") == .failure(.tooLarge))
        #expect(SizeParser.parse("9199999999999999999") == 9_199_999_999_999_999_999)
        #expect(SizeParser.parse("9200000000000000000") == nil)
        #expect(SizeParser.parse("9223372036854775807") == nil)
        #expect(SizeParser.parse("7.99E") == nil)
        #expect(SizeParser.parse("7.9E") == 9_108_079_886_394_091_136)
    }

    @Test func hexSuffixWarns() {
        var warnings: [String] = []
        #expect(SizeParser.strtosz("0x2k") { warnings.append($0) } == .success(2048))
        #expect(warnings == ["Using a multiplier suffix on hex numbers is deprecated: 0x2k"])
        #expect(SizeParser.strtosz("2k") { warnings.append($0) } == .success(2048))
        #expect(warnings.count == 1)
    }
}
