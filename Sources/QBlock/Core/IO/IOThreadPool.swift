#if canImport(Glibc)
import Glibc
#endif
import Foundation

/// A dedicated pool of threads for blocking system calls, so that they never run on
/// Swift's cooperative thread pool (whose few threads must never block).
///
/// Work is a closure run on one of the pool's threads; the awaiting task resumes when it
/// returns. Threads are started on demand, when work arrives and none is idle, up to
/// `maxThreads` (64 by default, QEMU's thread-pool size), so that `O_DIRECT` requests at
/// a high queue depth really are in flight together. The pool lives for the whole process
/// (``IOThreadPool/shared``), like swift-nio's `NIOThreadPool.singleton`.
// @unchecked: `queue`, `head`, `threads` and `idle` are only touched with `condition` held;
// `maxThreads` is immutable.
public final class IOThreadPool: @unchecked Sendable {
    /// The process-wide pool.
    public static let shared = IOThreadPool(maxThreads: 64)

    private let condition = NSCondition()
    private var queue: [() -> Void] = []
    private var head = 0
    private var threads = 0
    private var idle = 0
    /// The most threads the pool starts; more jobs than that wait in its queue.
    public let maxThreads: Int

    /// Creates a pool that starts threads on demand, up to `maxThreads` (at least 1).
    public init(maxThreads: Int) {
        self.maxThreads = max(1, maxThreads)
    }

    private func startThread() {
        let t = Thread { [unowned self] in self.workerLoop() }
        t.name = "qblock-io-\(threads)"
        t.stackSize = 256 * 1024
        threads += 1
        t.start()
    }

    private func workerLoop() {
        condition.lock()
        while true {
            while head == queue.count {
                idle += 1
                condition.wait()
                idle -= 1
            }
            let job = queue[head]
            head += 1
            if head == queue.count {
                queue.removeAll(keepingCapacity: true)
                head = 0
            }
            condition.unlock()
            job()
            condition.lock()
        }
    }

    /// Submits a closure without waiting for it.
    public func submit(_ job: @escaping () -> Void) {
        condition.lock()
        queue.append(job)
        // Every queued job needs a thread of its own: a signalled thread counts as idle until
        // it wakes, so compare the jobs waiting with the idle threads, not just "any idle".
        // (A job that blocks for long must never hold up the jobs queued behind it.)
        if queue.count - head > idle && threads < maxThreads {
            startThread()
        } else {
            condition.signal()
        }
        condition.unlock()
    }

    /// Runs `body` on a pool thread and returns its result.
    public func run<T>(_ body: @escaping () -> T) async -> T {
        await withUnsafeContinuation { (cont: UnsafeContinuation<T, Never>) in
            submit { cont.resume(returning: body()) }
        }
    }
}
