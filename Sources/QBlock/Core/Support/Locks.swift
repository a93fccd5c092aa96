#if canImport(Glibc)
import Glibc
#endif

/// A small pthread mutex for short, non-suspending critical sections.
// @unchecked: the only state is the heap-allocated pthread mutex, which exists to be used from several
// threads; the pointer itself is immutable and freed in `deinit`.
public final class PosixMutex: @unchecked Sendable {
    @usableFromInline let m = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)

    /// Creates an unlocked mutex.
    public init() { pthread_mutex_init(m, nil) }
    deinit {
        pthread_mutex_destroy(m)
        m.deallocate()
    }

    /// Runs `body` with the mutex held and returns its result. `body` must not suspend or
    /// take this mutex again (it is not recursive).
    // Inlinable: every layer takes these locks on its hot paths, and a call across a module
    // boundary would not be inlined or specialized (about 12% of qcow2 4 KiB IOPS).
    @inlinable @inline(__always)
    public func withLock<R>(_ body: () throws -> R) rethrows -> R {
        pthread_mutex_lock(m)
        defer { pthread_mutex_unlock(m) }
        return try body()
    }
}

/// A fair mutex for async code: waiters suspend instead of blocking a thread, and are
/// woken in FIFO order. Used where a critical section awaits I/O (qcow2 metadata updates),
/// like QEMU's `CoMutex`.
// @unchecked: `locked`, `waiters` and `waiterHead` are only touched with the PosixMutex `lock` held;
// waiters are resumed after it is released.
public final class AsyncMutex: @unchecked Sendable {
    private let lock = PosixMutex()
    private var locked = false
    private var waiters: [UnsafeContinuation<Void, Never>] = []
    private var waiterHead = 0

    /// Creates an unlocked mutex.
    public init() {}

    /// Takes the mutex, suspending (without blocking a thread) until it is free. Waiters
    /// get it in the order they asked.
    public func lock() async {
        let acquired: Bool = lock.withLock {
            if !locked { locked = true; return true }
            return false
        }
        if acquired { return }
        await withUnsafeContinuation { (c: UnsafeContinuation<Void, Never>) in
            let now: Bool = lock.withLock {
                if !locked { locked = true; return true }
                waiters.append(c)
                return false
            }
            if now { c.resume() }
        }
    }

    /// Releases the mutex; ownership passes directly to the oldest waiter, if any.
    public func unlock() {
        let next: UnsafeContinuation<Void, Never>? = lock.withLock {
            if waiterHead < waiters.count {
                let c = waiters[waiterHead]
                waiterHead += 1
                if waiterHead == waiters.count { waiters.removeAll(keepingCapacity: true); waiterHead = 0 }
                return c // ownership passes to the waiter; `locked` stays true
            }
            locked = false
            return nil
        }
        next?.resume()
    }

    /// Runs `body` with the mutex held (it may suspend) and releases it afterwards, also
    /// when `body` throws.
    @inlinable
    public func withLock<R>(_ body: () async throws -> R) async rethrows -> R {
        await lock()
        defer { unlock() }
        return try await body()
    }
}

/// A one-shot event async tasks can wait on (like a `CoQueue` for one condition).
// @unchecked: `signalled` and `waiters` are only touched with `lock` held.
public final class AsyncEvent: @unchecked Sendable {
    private let lock = PosixMutex()
    private var signalled = false
    private var waiters: [UnsafeContinuation<Void, Never>] = []

    /// Creates an event that has not been signalled.
    public init() {}

    /// Returns once the event is signalled (at once if it already was).
    public func wait() async {
        if lock.withLock({ signalled }) { return }
        await withUnsafeContinuation { (c: UnsafeContinuation<Void, Never>) in
            let now: Bool = lock.withLock {
                if signalled { return true }
                waiters.append(c)
                return false
            }
            if now { c.resume() }
        }
    }

    /// Signals the event: wakes every waiter, and every later ``wait()`` returns at once.
    public func signal() {
        let ws: [UnsafeContinuation<Void, Never>] = lock.withLock {
            signalled = true
            let w = waiters
            waiters = []
            return w
        }
        for w in ws { w.resume() }
    }
}

/// A Boolean read and set from any thread.
// @unchecked: `flag` is only touched with `lock` held.
package final class LockedFlag: @unchecked Sendable {
    // @unchecked: `flag` is only touched with `lock` held.
    private let lock = PosixMutex()
    private var flag = false
    package init() {}
    package var value: Bool { lock.withLock { flag } }
    package func set(_ v: Bool) { lock.withLock { flag = v } }
}
