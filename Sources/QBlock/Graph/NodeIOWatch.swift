import Synchronization

/// What the graph watches on every write reaching a node, whatever its driver: the highest
/// offset written (QEMU's `wr_highest_offset`), discards (the `file` driver's
/// `driver-specific` statistics), and a one-shot write threshold (QEMU's
/// `block-set-write-threshold`: the first write, write-zeroes or discard ending beyond it
/// calls the handler once and resets the threshold to 0).
///
/// The data path pays two relaxed atomic operations per write: a load of the threshold and
/// a max on the highest offset; nothing is locked unless the threshold fires.
public final class NodeIOWatch: Sendable {
    private let highest = Atomic<Int64>(0)
    private let threshold = Atomic<UInt64>(0)
    private let discardsOK = Atomic<Int64>(0)
    private let discardsFailed = Atomic<Int64>(0)
    private let discardBytes = Atomic<Int64>(0)
    private let handler = Mutex<(@Sendable (_ exceeded: UInt64, _ threshold: UInt64) -> Void)?>(nil)

    /// Creates a watch with nothing written, no discards and no threshold set.
    public init() {}

    /// The highest end offset of a successful write, write-zeroes or discard.
    public var highestOffset: Int64 { highest.load(ordering: .relaxed) }
    /// The current write threshold in bytes (0: none).
    public var writeThreshold: UInt64 { threshold.load(ordering: .relaxed) }
    /// Discards that succeeded, failed, and the bytes of those that succeeded.
    public var discards: (ok: Int64, failed: Int64, bytes: Int64) {
        (discardsOK.load(ordering: .relaxed), discardsFailed.load(ordering: .relaxed), discardBytes.load(ordering: .relaxed))
    }

    /// Sets the threshold (0 disables it) and what is called when a write crosses it: the
    /// bytes beyond the threshold and the threshold itself.
    public func setWriteThreshold(_ value: UInt64, onExceeded: (@Sendable (UInt64, UInt64) -> Void)?) {
        handler.withLock { $0 = onExceeded }
        threshold.store(value, ordering: .relaxed)
    }

    /// Before a write of `length` bytes at `offset`.
    @inline(__always)
    func willWrite(offset: Int64, length: Int64) {
        let t = threshold.load(ordering: .relaxed)
        guard t != 0 else { return }
        let end = UInt64(clamping: offset) &+ UInt64(clamping: length)
        guard end > t else { return }
        // Only the write that wins the reset reports (QEMU's cmpxchg).
        guard threshold.compareExchange(expected: t, desired: 0, ordering: .relaxed).exchanged else { return }
        if let h = handler.withLock({ $0 }) { h(end - t, t) }
    }

    /// After a successful write ending at `end`.
    @inline(__always)
    func didWrite(end: Int64) {
        if end > highest.load(ordering: .relaxed) { highest.max(end, ordering: .relaxed) }
    }

    func didDiscard(length: Int64, ok: Bool) {
        if ok {
            discardsOK.add(1, ordering: .relaxed)
            discardBytes.add(length, ordering: .relaxed)
        } else {
            discardsFailed.add(1, ordering: .relaxed)
        }
    }
}
