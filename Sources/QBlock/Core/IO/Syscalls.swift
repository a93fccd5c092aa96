#if canImport(Glibc)
import Glibc
#endif
import CSupport

/// The system-call seam: every blocking call QBlock makes goes through here.
///
/// Each function retries `EINTR` in this one place and returns `Result<_, Errno>`.
/// Tests can install an ``Syscalls/injector`` to make chosen calls fail (EIO, ENOSPC)
/// or return short counts without touching a real disk.
public enum Syscalls {
    /// An errno value.
    public struct Errno: Error, Equatable, Sendable {
        public let rawValue: Int32
        public init(_ v: Int32) { rawValue = v }
    }

    /// The calls a fault injector may intercept.
    public enum Call: Sendable { case pread, pwrite, fsync, fallocate, ftruncate }

    /// A hook for tests: given a call, fd and offset, return an errno to fail with, or nil.
    nonisolated(unsafe) public static var injector: (@Sendable (Call, Int32, Int64) -> Int32?)?

    /// A mutating call as a crash simulator sees it.
    public enum RecordedCall: Sendable {
        case pwrite(fd: Int32, offset: Int64, data: [UInt8])
        case fallocate(fd: Int32, mode: Int32, offset: Int64, length: Int64)
        case ftruncate(fd: Int32, length: Int64)
        case fdatasync(fd: Int32)
    }

    /// A hook for tests: sees every mutating call, in the order issued, before it runs
    /// (a crash-consistency test replays prefixes of this log). While it or ``injector``
    /// is set, I/O goes through these functions rather than io_uring.
    nonisolated(unsafe) public static var recorder: (@Sendable (RecordedCall) -> Void)?

    /// Per-descriptor fault hooks (see ``setFaultHook(fd:_:)``), guarded by `faultHookLock`.
    nonisolated(unsafe) private static var faultHooks: [Int32: @Sendable (Call, Int64) -> Int32?] = [:]
    nonisolated(unsafe) private static var faultHookCount = 0
    private static let faultHookLock = PosixMutex()

    /// Installs (or with nil, removes) a fault hook for one file descriptor: given a call and
    /// offset on `fd`, it returns an errno to fail with, or nil. Unlike ``injector``, hooks
    /// of tests running side by side neither replace nor remove each other. Remove the hook
    /// before the descriptor is closed: descriptor numbers are reused.
    public static func setFaultHook(fd: Int32, _ hook: (@Sendable (Call, Int64) -> Int32?)?) {
        faultHookLock.withLock {
            faultHooks[fd] = hook
            faultHookCount = faultHooks.count
        }
    }

    /// True when tests intercept calls (io_uring is bypassed then).
    package static var intercepted: Bool { injector != nil || recorder != nil || faultHookCount > 0 }

    @inline(__always)
    static func injected(_ call: Call, _ fd: Int32, _ offset: Int64) -> Errno? {
        if faultHookCount > 0, let hook = faultHookLock.withLock({ faultHooks[fd] }), let e = hook(call, offset) {
            return Errno(e)
        }
        guard let inj = injector, let e = inj(call, fd, offset) else { return nil }
        return Errno(e)
    }

    public static func open(_ path: String, _ flags: Int32, _ mode: mode_t = 0o644) -> Result<Int32, Errno> {
        while true {
            let fd = Glibc.open(path, flags, mode)
            if fd >= 0 { return .success(fd) }
            if errno != EINTR { return .failure(Errno(errno)) }
        }
    }

    public static func close(_ fd: Int32) {
        _ = Glibc.close(fd)
    }

    /// Reads until `count` bytes were read or end of file; returns the bytes read.
    public static func pread(_ fd: Int32, _ buf: UnsafeMutableRawPointer, _ count: Int, _ offset: Int64) -> Result<Int, Errno> {
        if let e = injected(.pread, fd, offset) { return .failure(e) }
        var done = 0
        while done < count {
            let r = Glibc.pread(fd, buf + done, count - done, off_t(offset) + off_t(done))
            if r < 0 {
                if errno == EINTR { continue }
                return .failure(Errno(errno))
            }
            if r == 0 { break }
            done += r
        }
        return .success(done)
    }

    /// Writes all of `count` bytes.
    public static func pwrite(_ fd: Int32, _ buf: UnsafeRawPointer, _ count: Int, _ offset: Int64) -> Result<Int, Errno> {
        if let e = injected(.pwrite, fd, offset) { return .failure(e) }
        if let rec = recorder { rec(.pwrite(fd: fd, offset: offset, data: Array(UnsafeRawBufferPointer(start: buf, count: count)))) }
        var done = 0
        while done < count {
            let r = Glibc.pwrite(fd, buf + done, count - done, off_t(offset) + off_t(done))
            if r < 0 {
                if errno == EINTR { continue }
                return .failure(Errno(errno))
            }
            if r == 0 { return .failure(Errno(EIO)) }
            done += r
        }
        return .success(done)
    }

    public static func fdatasync(_ fd: Int32) -> Result<Void, Errno> {
        if let e = injected(.fsync, fd, 0) { return .failure(e) }
        if let rec = recorder { rec(.fdatasync(fd: fd)) }
        while true {
            if Glibc.fdatasync(fd) == 0 { return .success(()) }
            if errno != EINTR { return .failure(Errno(errno)) }
        }
    }

    public static func ftruncate(_ fd: Int32, _ length: Int64) -> Result<Void, Errno> {
        if let e = injected(.ftruncate, fd, length) { return .failure(e) }
        if let rec = recorder { rec(.ftruncate(fd: fd, length: length)) }
        while true {
            if Glibc.ftruncate(fd, off_t(length)) == 0 { return .success(()) }
            if errno != EINTR { return .failure(Errno(errno)) }
        }
    }

    public static func fallocate(_ fd: Int32, _ mode: Int32, _ offset: Int64, _ length: Int64) -> Result<Void, Errno> {
        if let e = injected(.fallocate, fd, offset) { return .failure(e) }
        if let rec = recorder { rec(.fallocate(fd: fd, mode: mode, offset: offset, length: length)) }
        let r = qb_fallocate(fd, mode, offset, length)
        return r == 0 ? .success(()) : .failure(Errno(-r))
    }

    /// lseek with SEEK_DATA / SEEK_HOLE; ENXIO is returned as a failure for the caller to interpret.
    public static func lseek(_ fd: Int32, _ offset: Int64, _ whence: Int32) -> Result<Int64, Errno> {
        let r = Glibc.lseek(fd, off_t(offset), whence)
        return r < 0 ? .failure(Errno(errno)) : .success(Int64(r))
    }

    public static func fstat(_ fd: Int32) -> Result<stat, Errno> {
        var st = stat()
        return Glibc.fstat(fd, &st) == 0 ? .success(st) : .failure(Errno(errno))
    }
}
