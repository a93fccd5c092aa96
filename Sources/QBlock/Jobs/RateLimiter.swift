#if canImport(Glibc)
import Glibc
#endif
import QBlockCore

/// Time as jobs see it, so that tests can drive rate limits with a virtual clock.
public protocol JobClock: Sendable {
    /// Nanoseconds since an arbitrary origin; never goes backwards.
    func now() -> UInt64
    /// Suspends for `nanoseconds` (returns early when the task is cancelled).
    func sleep(nanoseconds: UInt64) async
}

/// The monotonic system clock.
public struct SystemJobClock: JobClock {
    /// The system clock (it has no state).
    public init() {}
    /// `CLOCK_MONOTONIC` in nanoseconds.
    public func now() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
    }
    /// Sleeps with `Task.sleep`; returns early when the task is cancelled.
    public func sleep(nanoseconds: UInt64) async {
        try? await Task.sleep(nanoseconds: nanoseconds)
    }
}

/// A clock that only moves when told to (tests). Sleepers wake when ``advance(by:)``
/// passes their deadline.
// @unchecked: `current` and `sleepers` are only touched with `lock` held; sleepers are resumed after it
// is released.
public final class ManualJobClock: JobClock, @unchecked Sendable {
    private let lock = PosixMutex()
    private var current: UInt64
    private var sleepers: [(deadline: UInt64, wake: UnsafeContinuation<Void, Never>)] = []

    /// Creates a clock showing `start` nanoseconds.
    public init(start: UInt64 = 0) { current = start }

    /// The clock's current time, moved only by ``advance(by:)``.
    public func now() -> UInt64 { lock.withLock { current } }

    /// Number of tasks sleeping on this clock.
    public var sleeperCount: Int { lock.withLock { sleepers.count } }

    /// Suspends until ``advance(by:)`` moves the clock `nanoseconds` past now (returns at once for 0).
    public func sleep(nanoseconds: UInt64) async {
        await withUnsafeContinuation { (c: UnsafeContinuation<Void, Never>) in
            let now: Bool = lock.withLock {
                if nanoseconds == 0 { return true }
                sleepers.append((current + nanoseconds, c))
                return false
            }
            if now { c.resume() }
        }
    }

    /// Moves time forward and wakes every sleeper whose deadline has come.
    public func advance(by nanoseconds: UInt64) {
        let due: [UnsafeContinuation<Void, Never>] = lock.withLock {
            current += nanoseconds
            let d = sleepers.filter { $0.deadline <= current }.map(\.wake)
            sleepers.removeAll { $0.deadline <= current }
            return d
        }
        for c in due { c.resume() }
    }
}

/// A token bucket: `rate` bytes per second, with a burst of one slice (100 ms, QEMU's
/// `BLOCK_JOB_SLICE_TIME`). A copy loop accounts what it moved with ``account(_:now:)``,
/// which returns how long to wait before moving more. Going into debt is allowed, so a
/// request larger than the burst still goes through, followed by a proportional pause.
public struct TokenBucket: Sendable, Equatable {
    /// Bytes per second; 0 means unlimited.
    public private(set) var rate: UInt64
    /// Tokens (bytes) available; negative is debt.
    public private(set) var tokens: Double
    private var last: UInt64?
    /// The burst: one slice's worth of bytes.
    public static let sliceNanoseconds: UInt64 = 100_000_000

    /// Creates a bucket limited to `rate` bytes per second (0: unlimited), with no tokens.
    public init(rate: UInt64 = 0) {
        self.rate = rate
        self.tokens = 0
    }

    var burst: Double { Double(rate) * Double(Self.sliceNanoseconds) / 1e9 }

    /// Changes the rate (block-job-set-speed); the bucket keeps its debt.
    public mutating func setRate(_ newRate: UInt64) {
        rate = newRate
        tokens = min(tokens, burst)
    }

    /// Takes `bytes` tokens at time `now` and returns the nanoseconds to wait before the
    /// next transfer (0: go on).
    public mutating func account(_ bytes: Int64, now: UInt64) -> UInt64 {
        guard rate > 0 else { last = now; return 0 }
        refill(now: now)
        tokens -= Double(bytes)
        return delay()
    }

    /// Nanoseconds until the bucket is out of debt at time `now`, without taking tokens.
    public mutating func pendingDelay(now: UInt64) -> UInt64 {
        guard rate > 0 else { return 0 }
        refill(now: now)
        return delay()
    }

    private mutating func refill(now: UInt64) {
        if let last, now > last {
            tokens = min(burst, tokens + Double(now - last) * Double(rate) / 1e9)
        } else if last == nil {
            tokens = burst
        }
        last = now
    }

    private func delay() -> UInt64 {
        tokens >= 0 ? 0 : UInt64((-tokens * 1e9 / Double(rate)).rounded(.up))
    }
}
