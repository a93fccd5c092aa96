#if canImport(Glibc)
import Glibc
#endif

/// Buffered writes to one file, run one after another by a single pool thread that drains a
/// queue (a user-space version of io_uring's per-inode hashing of its worker queue).
///
/// Why: a buffered write holds the file's inode lock while it copies into the page cache
/// (ext4, XFS and most other filesystems), so two at once never run in parallel; they only
/// make the second writer spin on the lock, stealing a core from the readers. io_uring runs
/// such writes in a kernel worker per submitting thread, so tasks on different cooperative
/// threads end up in different workers contending like that. Here the next write is already
/// queued when the current one ends (no gap, no hop back through an awaiting task), and only
/// one is ever inside the kernel. Reads and `O_DIRECT` writes do not use this.
// @unchecked: `queue`, `head` and `draining` are only touched with `lock` held; `fd` and `pool` are
// immutable.
package final class SerialWriteQueue: @unchecked Sendable {
    private struct Request {
        let buffer: SendablePointer
        let count: Int
        let offset: Int64
        let continuation: UnsafeContinuation<Result<Int, Syscalls.Errno>, Never>
    }

    private let fd: Int32
    private let pool: IOThreadPool
    private let lock = PosixMutex()
    private var queue: [Request] = []
    private var head = 0
    private var draining = false

    package init(fd: Int32, pool: IOThreadPool) {
        self.fd = fd
        self.pool = pool
    }

    /// Writes all `count` bytes at `offset` (after every write queued before it).
    package func write(_ buffer: SendablePointer, _ count: Int, _ offset: Int64) async -> Result<Int, Syscalls.Errno> {
        await withUnsafeContinuation { (c: UnsafeContinuation<Result<Int, Syscalls.Errno>, Never>) in
            let start: Bool = lock.withLock {
                queue.append(Request(buffer: buffer, count: count, offset: offset, continuation: c))
                if draining { return false }
                draining = true
                return true
            }
            if start { pool.submit { self.drain() } }
        }
    }

    /// Runs on a pool thread until the queue is empty.
    private func drain() {
        while true {
            let next: Request? = lock.withLock {
                if head == queue.count {
                    queue.removeAll(keepingCapacity: true)
                    head = 0
                    draining = false
                    return nil
                }
                let r = queue[head]
                head += 1
                return r
            }
            guard let r = next else { return }
            // SAFETY: the caller's buffer stays valid until its continuation resumes, which
            // happens only after this call returns.
            let result = Syscalls.pwrite(fd, r.buffer.raw, r.count, r.offset)
            r.continuation.resume(returning: result)
        }
    }
}
