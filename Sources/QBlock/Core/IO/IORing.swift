#if canImport(Glibc)
import Glibc
#endif
import CSupport
import Foundation

/// Positional I/O through a few process-wide io_uring rings: requests are submitted from
/// the calling task without a thread hop, and a dedicated reaper thread per ring resumes each
/// awaiting task when its completion arrives. Where the kernel refuses io_uring (or
/// `QBLOCK_IO=threads` is set) ``shared`` is nil and callers use ``IOThreadPool``.
///
/// Why several rings: the kernel performs a buffered read or write inline while it takes the
/// submission (the page-cache copy happens inside `io_uring_enter`, under the ring's lock),
/// so two tasks submitting to one ring copy one after the other. With a ring per core and a
/// submitter that skips a ring another thread is in, those copies run on all cores at once.
// @unchecked: `next` is only touched with `nextRing` held; each ring in `rings` is used under its own
// lock in the C helper; `rings` is immutable.
package final class IORing: @unchecked Sendable {
    package enum Op: Int32 {
        case read = 0
        case write = 1
        case fdatasync = 2
    }

    package static let shared: IORing? = {
        if ProcessInfo.processInfo.environment["QBLOCK_IO"] == "threads" { return nil }
        let count = min(8, max(1, ProcessInfo.processInfo.activeProcessorCount))
        return IORing(rings: count, entries: 256)
    }()

    /// Holds the continuation of one request while the kernel has it.
    private final class Waiter {
        let continuation: UnsafeContinuation<Int32, Never>
        init(_ c: UnsafeContinuation<Int32, Never>) { continuation = c }
    }

    private let rings: [OpaquePointer]
    /// Where the next submission starts looking for a free ring (a hint; races are harmless).
    private let nextRing = PosixMutex()
    private var next = 0

    /// SAFETY: a ring lives for the whole process; its submission side is locked in C and
    /// only its reaper thread touches the completion side.
    // @unchecked: an immutable ring pointer; the ring behind it is only used under its own lock in the
    // C helper.
    private struct RingHandle: @unchecked Sendable { let pointer: OpaquePointer }

    private init?(rings count: Int, entries: UInt32) {
        var made: [OpaquePointer] = []
        for i in 0..<count {
            guard let r = qb_uring_create(entries) else { break }
            made.append(r)
            let handle = RingHandle(pointer: r)
            let t = Thread { IORing.reap(handle.pointer) }
            t.name = "qblock-uring-\(i)"
            t.stackSize = 256 * 1024
            t.start()
        }
        if made.isEmpty { return nil }
        rings = made
    }

    private static func reap(_ ring: OpaquePointer) {
        var userData: UInt64 = 0
        var result: Int32 = 0
        while qb_uring_wait(ring, &userData, &result) == 0 {
            // SAFETY: user_data is the retained Waiter passed at submission; each completion
            // arrives exactly once, so it is released exactly once here.
            let waiter = Unmanaged<Waiter>.fromOpaque(UnsafeRawPointer(bitPattern: UInt(userData))!).takeRetainedValue()
            waiter.continuation.resume(returning: result)
        }
    }

    /// Performs one request. Returns the kernel's result (bytes or -errno); `-EBUSY`
    /// means the ring was full and nothing was done: the caller falls back to the pool.
    package func perform(_ op: Op, fd: Int32, buffer: UnsafeMutableRawPointer?, count: Int, offset: Int64) async -> Int32 {
        await withUnsafeContinuation { (c: UnsafeContinuation<Int32, Never>) in
            let waiter = Unmanaged.passRetained(Waiter(c))
            let token = UInt64(UInt(bitPattern: waiter.toOpaque()))
            let n = rings.count
            let start: Int = nextRing.withLock {
                let s = next
                next = (next + 1) % n
                return s
            }
            // The first ring no other thread is submitting to; if all are taken, wait for one.
            var r = Int32(QB_URING_BUSY)
            if n > 1 {
                for k in 0..<n where r == Int32(QB_URING_BUSY) {
                    r = qb_uring_submit(rings[(start + k) % n], op.rawValue, fd, buffer, UInt32(count), offset, token, 1)
                }
            }
            if r == Int32(QB_URING_BUSY) {
                r = qb_uring_submit(rings[start], op.rawValue, fd, buffer, UInt32(count), offset, token, 0)
            }
            if r != 0 {
                waiter.release()
                c.resume(returning: r)
            }
        }
    }
}
