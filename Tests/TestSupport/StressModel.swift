/// What a killed `qblock-stress` run must have left in its image: the byte model of the disk
/// and which bytes the model cannot know (requests that may have been in flight).
public struct StressModel: Sendable {
    /// The expected bytes.
    public var bytes: [UInt8]
    /// Bytes whose value is unknown (touched by a request that was not durable when the
    /// writer died).
    public var unknown: [Bool]
    /// The last round the writer reported flushed (-1: none).
    public let flushedRound: Int
    /// How many requests after the last flush the model counts as durable.
    public let durableAfterFlush: Int

    /// Builds the model from the writer's output. `initial` is the disk before the run (the
    /// backing file's bytes, or zeros). Rounds up to the last "FLUSHED n" are durable; with
    /// `writeThrough`, so is every request reported by "ACK round index" (each is written
    /// through before it completes). Any other request of a later round is unknown.
    public init(seed: UInt64, initial: [UInt8], output: String, writeThrough: Bool) {
        let size = initial.count
        var flushed = -1
        var acked = Set<[Int]>()
        for line in output.split(separator: "\n") {
            let f = line.split(separator: " ")
            if f.count == 2, f[0] == "FLUSHED", let r = Int(f[1]) { flushed = max(flushed, r) }
            if f.count == 3, f[0] == "ACK", let r = Int(f[1]), let i = Int(f[2]) { acked.insert([r, i]) }
        }
        var bytes = initial
        var unknown = [Bool](repeating: false, count: size)
        let lastAcked = acked.map { $0[0] }.max() ?? -1
        var durable = 0
        for round in 0...max(flushed + 2, lastAcked + 1) {
            for (index, op) in StressPlan.ops(seed: seed, round: round, size: size).enumerated() {
                let range = op.offset..<(op.offset + op.length)
                let value: UInt8 = op.kind == .write ? op.byte : 0
                if round <= flushed || (writeThrough && acked.contains([round, index])) {
                    if round > flushed { durable += 1 }
                    for i in range { bytes[i] = value; unknown[i] = false }
                } else {
                    for i in range { unknown[i] = true }
                }
            }
        }
        self.bytes = bytes
        self.unknown = unknown
        self.flushedRound = flushed
        self.durableAfterFlush = durable
    }

    /// The first offset where `got` differs from the model on a known byte, or nil.
    public func firstMismatch(_ got: [UInt8]) -> Int? {
        for i in 0..<bytes.count where !unknown[i] && got[i] != bytes[i] { return i }
        return nil
    }
}
