/// The writes of the mirror crash test, the same in the writer process and in the test:
/// write `i` puts `length` bytes of `byte` at `offset` (4 KiB aligned, up to 64 KiB).
public enum MirrorCrashPlan {
    /// Writes between two flushes.
    public static let writesPerFlush = 8

    public static func write(_ i: Int, seed: UInt64, size: Int64) -> (offset: Int64, length: Int, byte: UInt8) {
        var z = seed &+ UInt64(i + 1) &* 0x9E37_79B9_7F4A_7C15
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        z ^= z >> 31
        let length = 4096 * (1 + Int(z % 16))
        let offset = Int64((z >> 8) % UInt64((size - Int64(length)) / 4096)) * 4096
        return (offset, length, UInt8(truncatingIfNeeded: (z >> 40) | 1))
    }
}
