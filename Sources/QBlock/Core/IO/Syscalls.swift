#if canImport(Glibc)
import Glibc
#endif
import CSupport
import Synchronization

/// The system-call seam: every blocking call QBlock makes goes through here.
///
/// Each function retries `EINTR` in this one place and returns `Result<_, Errno>`.
///
/// Tests can make chosen calls fail (EIO, ENOSPC) with ``withInjector(path:_:_:)``, or see
/// every mutating call with ``withRecorder(path:_:_:)`` (a crash simulator replays prefixes
/// of that log). Like swift-system's mocking, a hook is scoped: it is installed for the
/// duration of the body only, and removed when the body returns or throws. It is keyed by
/// file, so that tests running side by side do not see each other's hooks: it applies to the
/// descriptors of the file at `path` (the same file, by device and inode, whatever the
/// spelling of its name) opened through ``open(_:_:_:)``, those already open when the
/// hook is installed and those opened while it is. Descriptors with a hook bypass io_uring.
public enum Syscalls {
    /// An errno value.
    public struct Errno: Error, Equatable, Sendable {
        public let rawValue: Int32
        public init(_ v: Int32) { rawValue = v }
    }

    /// The calls a fault injector may intercept.
    public enum Call: Sendable { case pread, pwrite, fsync, fallocate, ftruncate }

    /// A mutating call as a crash simulator sees it.
    public enum RecordedCall: Sendable {
        case pwrite(fd: Int32, offset: Int64, data: [UInt8])
        case fallocate(fd: Int32, mode: Int32, offset: Int64, length: Int64)
        case ftruncate(fd: Int32, length: Int64)
        case fdatasync(fd: Int32)
    }

    /// Runs `body` with `injector` consulted before every call on a descriptor of the file
    /// at `path`: given the call and its offset, it returns an errno to fail the call with,
    /// or nil to let it run. Removed when `body` ends, even by throwing.
    public static func withInjector<R>(path: String, _ injector: @escaping @Sendable (Call, Int64) -> Int32?,
                                       _ body: () async throws -> R) async rethrows -> R {
        let id = hooks.install(path: path, inject: injector, record: nil)
        defer { hooks.remove(id) }
        return try await body()
    }

    /// Runs `body` with `recorder` shown every mutating call on a descriptor of the file at
    /// `path`, in the order issued, before it runs. Removed when `body` ends, even by throwing.
    public static func withRecorder<R>(path: String, _ recorder: @escaping @Sendable (RecordedCall) -> Void,
                                       _ body: () async throws -> R) async rethrows -> R {
        let id = hooks.install(path: path, inject: nil, record: recorder)
        defer { hooks.remove(id) }
        return try await body()
    }

    /// The scoped test hooks and the descriptors they apply to.
    private static let hooks = HookRegistry()

    /// True when a test hook applies to `fd` (io_uring is bypassed for it then).
    package static func intercepts(_ fd: Int32) -> Bool { hooks.scopes(for: fd) != nil }

    @inline(__always)
    static func injected(_ call: Call, _ fd: Int32, _ offset: Int64) -> Errno? {
        guard let scopes = hooks.scopes(for: fd) else { return nil }
        for s in scopes.reversed() {
            if let inject = s.inject, let e = inject(call, offset) { return Errno(e) }
        }
        return nil
    }

    @inline(__always)
    static func recording(_ fd: Int32) -> [@Sendable (RecordedCall) -> Void]? {
        guard let scopes = hooks.scopes(for: fd) else { return nil }
        let r = scopes.compactMap(\.record)
        return r.isEmpty ? nil : r
    }

    /// open(2), retried on `EINTR`; the descriptor is registered for hooks installed later.
    /// - Returns: the descriptor, or the call's `errno`.
    public static func open(_ path: String, _ flags: Int32, _ mode: mode_t = 0o644) -> Result<Int32, Errno> {
        while true {
            let fd = Glibc.open(path, flags, mode)
            if fd >= 0 {
                hooks.opened(fd)
                return .success(fd)
            }
            if errno != EINTR { return .failure(Errno(errno)) }
        }
    }

    /// Closes a descriptor ``open(_:_:_:)`` returned.
    public static func close(_ fd: Int32) {
        // Forget the descriptor first: once closed, its number may go to another file.
        hooks.closing(fd)
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
        if let rec = recording(fd) {
            let call = RecordedCall.pwrite(fd: fd, offset: offset, data: Array(UnsafeRawBufferPointer(start: buf, count: count)))
            for r in rec { r(call) }
        }
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

    /// fdatasync(2), retried on `EINTR` (QEMU's `qemu_fdatasync`); a hook may inject a failure.
    /// - Returns: `.success` or the call's `errno`.
    public static func fdatasync(_ fd: Int32) -> Result<Void, Errno> {
        if let e = injected(.fsync, fd, 0) { return .failure(e) }
        if let rec = recording(fd) { for r in rec { r(.fdatasync(fd: fd)) } }
        while true {
            if Glibc.fdatasync(fd) == 0 { return .success(()) }
            if errno != EINTR { return .failure(Errno(errno)) }
        }
    }

    /// ftruncate(2) to `length` bytes, retried on `EINTR`.
    /// - Returns: `.success` or the call's `errno`.
    public static func ftruncate(_ fd: Int32, _ length: Int64) -> Result<Void, Errno> {
        if let e = injected(.ftruncate, fd, length) { return .failure(e) }
        if let rec = recording(fd) { for r in rec { r(.ftruncate(fd: fd, length: length)) } }
        while true {
            if Glibc.ftruncate(fd, off_t(length)) == 0 { return .success(()) }
            if errno != EINTR { return .failure(Errno(errno)) }
        }
    }

    /// fallocate(2) with `mode` (`FALLOC_FL_*`) over `length` bytes at byte `offset`.
    /// - Returns: `.success` or the call's `errno` (`EOPNOTSUPP` when the file system lacks the mode).
    public static func fallocate(_ fd: Int32, _ mode: Int32, _ offset: Int64, _ length: Int64) -> Result<Void, Errno> {
        if let e = injected(.fallocate, fd, offset) { return .failure(e) }
        if let rec = recording(fd) { for r in rec { r(.fallocate(fd: fd, mode: mode, offset: offset, length: length)) } }
        let r = qb_fallocate(fd, mode, offset, length)
        return r == 0 ? .success(()) : .failure(Errno(-r))
    }

    /// lseek with SEEK_DATA / SEEK_HOLE; ENXIO is returned as a failure for the caller to interpret.
    public static func lseek(_ fd: Int32, _ offset: Int64, _ whence: Int32) -> Result<Int64, Errno> {
        let r = Glibc.lseek(fd, off_t(offset), whence)
        return r < 0 ? .failure(Errno(errno)) : .success(Int64(r))
    }

    /// fstat(2).
    /// - Returns: the file's `stat`, or the call's `errno`.
    public static func fstat(_ fd: Int32) -> Result<stat, Errno> {
        var st = stat()
        return Glibc.fstat(fd, &st) == 0 ? .success(st) : .failure(Errno(errno))
    }
}

/// The hooks tests installed with ``Syscalls/withInjector(path:_:_:)`` and
/// ``Syscalls/withRecorder(path:_:_:)``, and which open descriptors each applies to.
///
/// Every descriptor ``Syscalls/open(_:_:_:)`` returns is remembered until
/// ``Syscalls/close(_:)``, so that a hook installed later finds the descriptors of its file
/// already open; a file is identified by device and inode.
// @unchecked: `nextID`, `scopes`, `open` and `byFD` are only touched with `lock` held; `matched` is an
// Atomic.
private final class HookRegistry: @unchecked Sendable {
    // @unchecked: every var is read and written only with `lock` held; `matched` is atomic.
    struct Scope: Sendable {
        let id: UInt64
        let path: String
        let inject: (@Sendable (Syscalls.Call, Int64) -> Int32?)?
        let record: (@Sendable (Syscalls.RecordedCall) -> Void)?
    }
    private struct FileID: Equatable { let dev: UInt64; let ino: UInt64 }

    private let lock = PosixMutex()
    private var nextID: UInt64 = 1
    private var scopes: [Scope] = []
    /// Descriptors opened through the seam and not closed yet.
    private var open: Set<Int32> = []
    /// The scopes whose file each open descriptor is (only descriptors with hooks).
    private var byFD: [Int32: [Scope]] = [:]
    /// `byFD.count`, read without the lock so that calls without hooks pay one atomic load.
    private let matched = Atomic<Int>(0)

    private static func fileID(fd: Int32) -> FileID? {
        var st = stat()
        return fstat(fd, &st) == 0 ? FileID(dev: UInt64(st.st_dev), ino: UInt64(st.st_ino)) : nil
    }

    private static func fileID(path: String) -> FileID? {
        var st = stat()
        return stat(path, &st) == 0 ? FileID(dev: UInt64(st.st_dev), ino: UInt64(st.st_ino)) : nil
    }

    @inline(__always)
    func scopes(for fd: Int32) -> [Scope]? {
        if matched.load(ordering: .acquiring) == 0 { return nil }
        return lock.withLock { byFD[fd] }
    }

    func install(path: String, inject: (@Sendable (Syscalls.Call, Int64) -> Int32?)?,
                 record: (@Sendable (Syscalls.RecordedCall) -> Void)?) -> UInt64 {
        lock.withLock {
            let scope = Scope(id: nextID, path: path, inject: inject, record: record)
            nextID += 1
            scopes.append(scope)
            if let file = Self.fileID(path: path) {
                for fd in open where Self.fileID(fd: fd) == file { byFD[fd, default: []].append(scope) }
            }
            matched.store(byFD.count, ordering: .releasing)
            return scope.id
        }
    }

    func remove(_ id: UInt64) {
        lock.withLock {
            scopes.removeAll { $0.id == id }
            for (fd, list) in byFD {
                let kept = list.filter { $0.id != id }
                byFD[fd] = kept.isEmpty ? nil : kept
            }
            matched.store(byFD.count, ordering: .releasing)
        }
    }

    func opened(_ fd: Int32) {
        lock.withLock {
            open.insert(fd)
            guard !scopes.isEmpty, let file = Self.fileID(fd: fd) else { return }
            let mine = scopes.filter { Self.fileID(path: $0.path) == file }
            if !mine.isEmpty { byFD[fd] = mine }
            matched.store(byFD.count, ordering: .releasing)
        }
    }

    func closing(_ fd: Int32) {
        lock.withLock {
            open.remove(fd)
            if byFD.removeValue(forKey: fd) != nil { matched.store(byFD.count, ordering: .releasing) }
        }
    }
}
