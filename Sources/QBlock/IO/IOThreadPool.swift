#if canImport(Glibc)
import Glibc
#endif
import Foundation

/// A dedicated pool of threads for blocking system calls, so that they never run on
/// Swift's cooperative thread pool (whose few threads must never block).
///
/// Work is a closure run on one of the pool's threads; the awaiting task resumes when it
/// returns. The pool is created once per process (``IOThreadPool/shared``) and lives for
/// the whole process, like swift-nio's `NIOThreadPool.singleton`.
public final class IOThreadPool: @unchecked Sendable {
    /// The process-wide pool.
    public static let shared = IOThreadPool(threads: max(8, ProcessInfo.processInfo.activeProcessorCount * 4))

    private let condition = NSCondition()
    private var queue: [() -> Void] = []
    private var head = 0
    private let threadCount: Int

    public init(threads: Int) {
        threadCount = threads
        for i in 0..<threads {
            let t = Thread { [unowned self] in self.workerLoop() }
            t.name = "qblock-io-\(i)"
            t.stackSize = 256 * 1024
            t.start()
        }
    }

    private func workerLoop() {
        while true {
            condition.lock()
            while head == queue.count { condition.wait() }
            let job = queue[head]
            head += 1
            if head > 1024 && head * 2 > queue.count {
                queue.removeFirst(head)
                head = 0
            }
            condition.unlock()
            job()
        }
    }

    /// Submits a closure without waiting for it.
    public func submit(_ job: @escaping () -> Void) {
        condition.lock()
        queue.append(job)
        condition.signal()
        condition.unlock()
    }

    /// Runs `body` on a pool thread and returns its result.
    public func run<T>(_ body: @escaping () -> T) async -> T {
        await withUnsafeContinuation { (cont: UnsafeContinuation<T, Never>) in
            submit { cont.resume(returning: body()) }
        }
    }
}
