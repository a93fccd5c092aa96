#if canImport(Glibc)
import Glibc
#endif

/// A pthread mutex with a condition variable, for device state shared between the vCPU
/// thread, I/O completions and input threads (critical sections never suspend).
// @unchecked: the only state is the heap-allocated pthread mutex and condition, which exist to be used
// from several threads; the pointers are immutable and freed in `deinit`.
public final class DeviceLock: @unchecked Sendable {
    private let m = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let c = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)

    /// Creates an unlocked mutex with its condition variable.
    public init() {
        pthread_mutex_init(m, nil)
        pthread_cond_init(c, nil)
    }

    deinit {
        pthread_cond_destroy(c)
        pthread_mutex_destroy(m)
        c.deallocate()
        m.deallocate()
    }

    /// Runs `body` with the mutex held; `body` must not suspend or take this lock again.
    @inline(__always)
    public func withLock<R>(_ body: () throws -> R) rethrows -> R {
        pthread_mutex_lock(m)
        defer { pthread_mutex_unlock(m) }
        return try body()
    }

    /// Waits for ``broadcast()``; call with the lock held (inside ``withLock(_:)``).
    public func wait() { pthread_cond_wait(c, m) }

    /// Waits at most `seconds`; returns false on timeout. Call with the lock held.
    public func wait(seconds: Double) -> Bool {
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        let ns = Int(now.tv_nsec) + Int((seconds - seconds.rounded(.down)) * 1e9)
        var deadline = timespec(tv_sec: now.tv_sec + Int(seconds) + ns / 1_000_000_000, tv_nsec: ns % 1_000_000_000)
        return pthread_cond_timedwait(c, m, &deadline) == 0
    }

    /// Wakes every thread waiting on the condition (call with the lock held).
    public func broadcast() { pthread_cond_broadcast(c) }
}
