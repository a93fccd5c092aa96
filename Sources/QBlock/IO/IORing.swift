#if canImport(Glibc)
import Glibc
#endif
import CSupport
import Foundation

/// Positional I/O through one process-wide io_uring ring: requests are submitted from the
/// calling task without a thread hop, and a dedicated reaper thread resumes each awaiting
/// task when its completion arrives. Where the kernel refuses io_uring (or
/// `QBLOCK_IO=threads` is set) ``shared`` is nil and callers use ``IOThreadPool``.
final class IORing: @unchecked Sendable {
    enum Op: Int32 {
        case read = 0
        case write = 1
        case fdatasync = 2
    }

    static let shared: IORing? = {
        if ProcessInfo.processInfo.environment["QBLOCK_IO"] == "threads" { return nil }
        return IORing(entries: 256)
    }()

    /// Holds the continuation of one request while the kernel has it.
    private final class Waiter {
        let continuation: UnsafeContinuation<Int32, Never>
        init(_ c: UnsafeContinuation<Int32, Never>) { continuation = c }
    }

    private let ring: OpaquePointer

    /// SAFETY: the ring lives for the whole process; its submission side is locked in C and
    /// only the reaper thread touches the completion side.
    private struct RingHandle: @unchecked Sendable { let pointer: OpaquePointer }

    private init?(entries: UInt32) {
        guard let r = qb_uring_create(entries) else { return nil }
        ring = r
        let handle = RingHandle(pointer: r)
        let t = Thread { IORing.reap(handle.pointer) }
        t.name = "qblock-uring"
        t.stackSize = 256 * 1024
        t.start()
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
    func perform(_ op: Op, fd: Int32, buffer: UnsafeMutableRawPointer?, count: Int, offset: Int64) async -> Int32 {
        await withUnsafeContinuation { (c: UnsafeContinuation<Int32, Never>) in
            let waiter = Unmanaged.passRetained(Waiter(c))
            let token = UInt64(UInt(bitPattern: waiter.toOpaque()))
            let r = qb_uring_submit(ring, op.rawValue, fd, buffer, UInt32(count), offset, token)
            if r != 0 {
                waiter.release()
                c.resume(returning: r)
            }
        }
    }
}
