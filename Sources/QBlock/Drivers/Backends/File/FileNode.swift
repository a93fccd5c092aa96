#if canImport(Glibc)
import Glibc
#endif
import CSupport
import QBlockCore
import QBlockGraph
import Synchronization

/// The `file` protocol driver: a regular file or a block device.
///
/// Reads and writes are positional calls on ``IOThreadPool``; write-zeroes and discard use
/// `fallocate` (zero-range, punch-hole); block status uses `SEEK_DATA`/`SEEK_HOLE`; flush is
/// `fdatasync`. With ``CacheMode/none`` the file is opened `O_DIRECT` and requests that are not
/// aligned are bounced through aligned buffers, so callers never see the alignment rule.
///
/// Ownership: the node owns its descriptor. ``close()`` refuses new requests, waits for the
/// ones in flight (whatever path they took: io_uring, the thread pool, the serial write
/// queue) and only then closes the descriptor, so no request ever reaches a descriptor
/// number the kernel has since given to another file. Every call after ``close()`` throws
/// ``BlockError`` with code `.closed`; closing twice is harmless.
///
/// The node is split by concern: opening and closing here, locks and reopen in
/// `FileNode+Reopen.swift`, reads, writes and flush in `FileNode+ReadWrite.swift`,
/// write-zeroes, discard and truncate in `FileNode+Zeroes.swift`, block status in
/// `FileNode+BlockStatus.swift`, the synchronous last-chance writes in
/// `FileNode+SynchronousWrite.swift`. The stored state is internal (not private) so that
/// those files reach it; nothing outside this folder uses it.
// @unchecked Sendable: `mode`, `retiredFDs`, `cachedLength` and `fdsClosed` are only touched
// with `sizeLock` held; `supportsZeroRange`/`supportsPunchHole` are atomics; the rest is
// immutable or thread-safe itself.
public final class FileNode: BlockDriver, @unchecked Sendable {
    /// `file`, as QEMU names the protocol driver (also for block devices, QEMU's `host_device`).
    public let driverName = "file"
    /// The path the file was opened with.
    public let filename: String
    /// Whether writes are refused (the descriptor is O_RDONLY); ``reopen(readOnly:cache:)`` changes it.
    public var isReadOnly: Bool { sizeLock.withLock { mode.readOnly } }
    /// The host cache mode; ``reopen(readOnly:cache:)`` changes it.
    public var cacheMode: CacheMode { sizeLock.withLock { mode.cache } }
    /// Whether the path is a block device rather than a regular file.
    public let isBlockDevice: Bool
    /// 1: unaligned requests are bounced internally under `O_DIRECT`, so callers see none.
    public var requestAlignment: Int { 1 }
    /// Always `nil`: a protocol node has no children.
    public var file: (any BlockDriver)? { nil }
    /// Always `nil`: a protocol node has no children.
    public var backing: (any BlockDriver)? { nil }

    /// What a reopen replaces, together: the descriptor and the flags it was opened with.
    struct Mode {
        var fd: Int32
        var readOnly: Bool
        var cache: CacheMode
        /// Alignment O_DIRECT requires of offsets, lengths and buffer addresses.
        var directAlignment: Int
        /// Buffered writes to a regular file, one at a time and back to back (see ``SerialWriteQueue``).
        var serialWrites: SerialWriteQueue?
        /// The image locks taken on `fd`, to take again on a new descriptor.
        var locked: (perm: BlockPermissions, shared: BlockPermissions)?
    }
    /// The descriptor and its mode (guarded by `sizeLock`).
    var mode: Mode
    /// Descriptors replaced by a reopen: a request that read the old descriptor just
    /// before the switch may still use it, so they stay open (unlocked) until ``close()``
    /// and their numbers are never reused for another file meanwhile (guarded by `sizeLock`).
    var retiredFDs: [Int32] = []
    package var fd: Int32 { sizeLock.withLock { mode.fd } }
    var directAlignment: Int { sizeLock.withLock { mode.directAlignment } }
    var serialWrites: SerialWriteQueue? { sizeLock.withLock { mode.serialWrites } }
    let pool: IOThreadPool
    /// The io_uring rings requests go through, nil for the thread pool (`aio=threads`, or a
    /// kernel without io_uring).
    let ring: IORing?
    /// How requests are submitted, as asked at open (nil: automatic).
    public let aio: AIOMode?
    /// Guards `mode`, `retiredFDs`, `cachedLength` and `fdsClosed`.
    let sizeLock = PosixMutex()
    /// The file's size as this node last saw it (guarded by `sizeLock`).
    var cachedLength: Int64
    /// Set once ``close()`` has closed the descriptors (guarded by `sizeLock`).
    var fdsClosed = false
    /// Open/closed state and the requests in flight (see ``CloseGate``).
    let gate = CloseGate()
    /// Orders unaligned O_DIRECT writes (read-modify-write of their aligned blocks) against
    /// every overlapping write, zeroing and discard (used only when O_DIRECT needs alignment).
    let inflight = RangeSerializer()
    /// Whether `FALLOC_FL_ZERO_RANGE` may work on this file: true until it first fails.
    /// Concurrent requests read and clear it, so it is an atomic; relaxed ordering is
    /// enough, because it is a hint: a request that still sees `true` after another
    /// cleared it only tries the call once more, fails the same way, and falls back.
    let supportsZeroRange = Atomic<Bool>(true)
    /// Whether `FALLOC_FL_PUNCH_HOLE` may work on this file: true until it first fails
    /// (an atomic hint, like ``supportsZeroRange``).
    let supportsPunchHole = Atomic<Bool>(true)

    /// Opens `path`.
    /// - Parameters:
    ///   - readOnly: open O_RDONLY and refuse writes.
    ///   - cache: host cache mode.
    ///   - perm: permissions this user takes, for QEMU-compatible image locking.
    ///   - shared: permissions this user lets other processes take.
    ///   - locking: false to skip image locks entirely.
    ///   - create: create the file if missing (truncating it is the caller's business).
    ///   - aio: how requests are submitted: `threads` uses the thread pool only; `native` and
    ///     `io_uring` use io_uring (`native` only with `O_DIRECT`, as QEMU); nil: io_uring
    ///     when the kernel has it.
    /// - Throws: ``BlockError`` `.invalidArgument` for `aio=native` without `O_DIRECT`.
    public init(path: String, readOnly: Bool, cache: CacheMode = .writeback,
                perm: BlockPermissions? = nil, shared: BlockPermissions = .all,
                locking: Bool = true, create: Bool = false,
                pool: IOThreadPool = .shared, aio: AIOMode? = nil) throws {
        if let aio, let conflict = aio.conflict(with: cache) {
            throw BlockError(.invalidArgument, conflict, path: path, operation: "open")
        }
        self.filename = path
        self.pool = pool
        self.aio = aio
        self.ring = aio == .threads ? nil : IORing.shared
        let fd = try Self.openDescriptor(path, readOnly: readOnly, cache: cache, create: create)
        guard case .success(let st) = Syscalls.fstat(fd) else {
            Syscalls.close(fd)
            throw BlockError.system(errno, "fstat", path: path)
        }
        let fileType = st.st_mode & S_IFMT
        if fileType == S_IFDIR {
            Syscalls.close(fd)
            throw BlockError(.invalidArgument, "'\(path)' is a directory", errno: EISDIR, path: path, operation: "open")
        }
        isBlockDevice = fileType == S_IFBLK
        if isBlockDevice {
            let s = qb_blkdev_size(fd)
            if s < 0 {
                Syscalls.close(fd)
                throw BlockError.system(Int32(-s), "BLKGETSIZE64", path: path)
            }
            cachedLength = s
        } else {
            cachedLength = Int64(st.st_size)
        }
        self.mode = Mode(fd: fd, readOnly: readOnly, cache: cache,
                    directAlignment: Self.directAlignment(cache, st),
                    serialWrites: !cache.direct && !isBlockDevice && !readOnly ? SerialWriteQueue(fd: fd, pool: pool) : nil)
        if locking {
            let p = perm ?? (readOnly ? [.consistentRead] : [.consistentRead, .write])
            do {
                try ImageLock.acquire(fd: fd, path: path, perm: p, shared: shared)
            } catch {
                Syscalls.close(fd)
                throw error
            }
            self.mode.locked = (p, shared)
        }
    }

    static func openDescriptor(_ path: String, readOnly: Bool, cache: CacheMode, create: Bool) throws -> Int32 {
        var flags = (readOnly ? O_RDONLY : O_RDWR) | O_CLOEXEC
        if cache.direct { flags |= qb_o_direct() }
        if create && !readOnly { flags |= O_CREAT }
        switch Syscalls.open(path, flags) {
        case .success(let f): return f
        case .failure(let e):
            if cache.direct && e.rawValue == EINVAL {
                throw BlockError(.unsupported, "Could not open '\(path)': filesystem does not support O_DIRECT",
                                 errno: e.rawValue, path: path, operation: "open")
            }
            throw BlockError.system(e.rawValue, "open", path: path)
        }
    }

    static func directAlignment(_ cache: CacheMode, _ st: stat) -> Int {
        cache.direct ? max(512, Int(st.st_blksize) > 4096 ? 4096 : Int(st.st_blksize)) : 1
    }

    deinit {
        // No request can be in flight: each holds a reference to the node.
        if !fdsClosed {
            Syscalls.close(mode.fd)
            for f in retiredFDs { Syscalls.close(f) }
        }
    }

    /// The file's size in bytes, cached and updated on writes past the end and on truncate.
    public var length: Int64 {
        sizeLock.withLock { cachedLength }
    }

    /// The number of bytes the file occupies on the host (st_blocks × 512).
    public var allocatedSize: Int64 {
        // A closed node's descriptor number may belong to another file now.
        guard gate.tryEnter() else { return 0 }
        defer { gate.leave() }
        guard case .success(let st) = Syscalls.fstat(fd) else { return 0 }
        return Int64(st.st_blocks) * 512
    }

    func checkWritable(_ op: String) throws {
        if isReadOnly { throw BlockError(.readOnly, "Permission denied: node is read-only", errno: EPERM, path: filename, operation: op) }
    }

    func isAligned(_ offset: Int64, _ count: Int, _ ptr: UnsafeRawPointer?) -> Bool {
        let a = directAlignment
        if a <= 1 { return true }
        return offset % Int64(a) == 0 && count % a == 0 && (ptr.map { Int(bitPattern: $0) % a == 0 } ?? true)
    }

    func noteExtent(_ end: Int64) {
        sizeLock.withLock { if end > cachedLength && !isBlockDevice { cachedLength = end } }
    }

    /// Refuses new requests, waits for those in flight, then releases the image locks and
    /// closes the descriptors. A second close returns once the first has finished.
    public func close() async throws {
        guard await gate.beginClose() else { return }
        await gate.drain()
        let (fd, retired) = sizeLock.withLock { () -> (Int32, [Int32]) in
            fdsClosed = true
            defer { retiredFDs = [] }
            return (mode.fd, retiredFDs)
        }
        ImageLock.release(fd: fd)
        Syscalls.close(fd)
        for f in retired { Syscalls.close(f) }
        gate.finishClose()
    }
}
