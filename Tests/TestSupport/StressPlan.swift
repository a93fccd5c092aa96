/// The deterministic workload of the crash-consistency test: the stress program runs it
/// and the test replays it to know what every flushed round wrote.
public enum StressPlan {
    public enum Kind: Sendable { case write, zero, zeroUnmap }

    public struct Op: Sendable {
        public let kind: Kind
        public let offset: Int
        public let length: Int
        public let byte: UInt8
    }

    /// The operations of `round`: non-overlapping, so their combined effect does not depend
    /// on the order in which they complete.
    public static func ops(seed: UInt64, round: Int, size: Int) -> [Op] {
        var state = seed &* 0x9e37_79b9_7f4a_7c15 &+ UInt64(round) &* 0xbf58_476d_1ce4_e5b9 | 1
        func next() -> UInt64 {
            state ^= state >> 12
            state ^= state << 25
            state ^= state >> 27
            return state &* 2_685_821_657_736_338_717
        }
        var ops: [Op] = []
        var taken: [Range<Int>] = []
        while ops.count < 16 {
            let len = Int(next() % 4 == 0 ? next() % 300_000 + 1 : next() % 12_000 + 1)
            let off = Int(next() % UInt64(size - len))
            let r = off..<(off + len)
            if taken.contains(where: { $0.overlaps(r) }) { continue }
            taken.append(r)
            let k = next() % 10
            let kind: Kind = k < 8 ? .write : (k == 8 ? .zero : .zeroUnmap)
            ops.append(Op(kind: kind, offset: off, length: len, byte: UInt8(truncatingIfNeeded: round * 7 + ops.count + 1) | 1))
        }
        return ops
    }
}
