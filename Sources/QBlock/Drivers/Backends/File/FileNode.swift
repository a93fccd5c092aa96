#if canImport(Glibc)
import Glibc
#endif
import CSupport
import QBlockCore
import QBlockGraph

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
// @unchecked Sendable: `mode`, `retiredFDs`, `cachedLength` and `fdsClosed` are only touched
// with `sizeLock` held; `supportsZeroRange`/`supportsPunchHole` are one-way hints (a stale
// read only retries a call that fails again); the rest is immutable or thread-safe itself.
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
    private struct Mode {
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
    private var mode: Mode
    /// Descriptors replaced by a reopen: a request that read the old descriptor just
    /// before the switch may still use it, so they stay open (unlocked) until ``close()``
    /// and their numbers are never reused for another file meanwhile.
    private var retiredFDs: [Int32] = []
    package var fd: Int32 { sizeLock.withLock { mode.fd } }
    var directAlignment: Int { sizeLock.withLock { mode.directAlignment } }
    private var serialWrites: SerialWriteQueue? { sizeLock.withLock { mode.serialWrites } }
    private let pool: IOThreadPool
    private let sizeLock = PosixMutex()
    private var cachedLength: Int64
    /// Set once ``close()`` has closed the descriptors (guarded by `sizeLock`).
    private var fdsClosed = false
    /// Open/closed state and the requests in flight (see ``CloseGate``).
    private let gate = CloseGate()
    /// Serializes read-modify-write cycles of unaligned O_DIRECT writes.
    private let rmwLock = AsyncMutex()
    private var supportsZeroRange = true
    private var supportsPunchHole = true

    /// Opens `path`.
    /// - Parameters:
    ///   - readOnly: open O_RDONLY and refuse writes.
    ///   - cache: host cache mode.
    ///   - perm: permissions this user takes, for QEMU-compatible image locking.
    ///   - shared: permissions this user lets other processes take.
    ///   - locking: false to skip image locks entirely.
    ///   - create: create the file if missing (truncating it is the caller's business).
    public init(path: String, readOnly: Bool, cache: CacheMode = .writeback,
                perm: BlockPermissions? = nil, shared: BlockPermissions = .all,
                locking: Bool = true, create: Bool = false,
                pool: IOThreadPool = .shared) throws {
        self.filename = path
        self.pool = pool
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

    private static func openDescriptor(_ path: String, readOnly: Bool, cache: CacheMode, create: Bool) throws -> Int32 {
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

    private static func directAlignment(_ cache: CacheMode, _ st: stat) -> Int {
        cache.direct ? max(512, Int(st.st_blksize) > 4096 ? 4096 : Int(st.st_blksize)) : 1
    }

    deinit {
        // No request can be in flight: each holds a reference to the node.
        if !fdsClosed {
            Syscalls.close(mode.fd)
            for f in retiredFDs { Syscalls.close(f) }
        }
    }

    /// Reopens the file with another mode (QEMU's reopen of a `file` node): a new
    /// descriptor opened `readOnly` (O_RDONLY or O_RDWR) with `cache`'s flags replaces the
    /// old one, and the image locks move to it (for the new mode: read-write takes QEMU's
    /// write lock). Call it with no request in flight (inside a drained section) and after
    /// a flush when going read-only. On failure nothing changes.
    /// - Throws: ``BlockError`` when the file cannot be opened so, or another process's lock
    ///   conflicts with the new mode.
    public func reopen(readOnly: Bool, cache: CacheMode) throws {
        try gate.runSync(filename, "reopen") { try reopenAdmitted(readOnly: readOnly, cache: cache) }
    }

    private func reopenAdmitted(readOnly: Bool, cache: CacheMode) throws {
        let old = sizeLock.withLock { mode }
        if old.readOnly == readOnly && old.cache == cache { return }
        let fd = try Self.openDescriptor(filename, readOnly: readOnly, cache: cache, create: false)
        guard case .success(let st) = Syscalls.fstat(fd) else {
            Syscalls.close(fd)
            throw BlockError.system(errno, "fstat", path: filename)
        }
        var new = Mode(fd: fd, readOnly: readOnly, cache: cache, directAlignment: Self.directAlignment(cache, st),
                       serialWrites: !cache.direct && !isBlockDevice && !readOnly ? SerialWriteQueue(fd: fd, pool: pool) : nil)
        if let (perm, shared) = old.locked {
            // The old description's locks would conflict with the new one's: drop them first.
            ImageLock.release(fd: old.fd)
            let p: BlockPermissions = readOnly ? perm.subtracting([.write, .resize]) : perm.union([.write])
            do {
                try ImageLock.acquire(fd: fd, path: filename, perm: p, shared: shared)
            } catch {
                ImageLock.release(fd: fd)
                Syscalls.close(fd)
                try? ImageLock.acquire(fd: old.fd, path: filename, perm: perm, shared: shared)
                throw error
            }
            new.locked = (p, shared)
        }
        sizeLock.withLock {
            mode = new
            retiredFDs.append(old.fd)
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

    private func checkWritable(_ op: String) throws {
        if isReadOnly { throw BlockError(.readOnly, "Permission denied: node is read-only", errno: EPERM, path: filename, operation: op) }
    }

    private func isAligned(_ offset: Int64, _ count: Int, _ ptr: UnsafeRawPointer?) -> Bool {
        let a = directAlignment
        if a <= 1 { return true }
        return offset % Int64(a) == 0 && count % a == 0 && (ptr.map { Int(bitPattern: $0) % a == 0 } ?? true)
    }

    // MARK: Read and write

    /// Reads `buffer.count` bytes at `offset` with pread(2); bytes past the end of file read
    /// as zeroes. Unaligned requests under `O_DIRECT` go through an aligned bounce buffer.
    /// - Throws: ``BlockError`` `.closed` after ``close()``, or an I/O error (`.io` with the errno).
    public func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws {
        try await gate.run(filename, "read") { try await readAdmitted(at: offset, into: buffer) }
    }

    /// ``read(at:into:)`` for a request already admitted by the gate.
    private func readAdmitted(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws {
        guard buffer.count > 0 else { return }
        if !isAligned(offset, buffer.count, buffer.baseAddress) {
            try await bouncedRead(at: offset, into: buffer)
            return
        }
        let p = SendablePointer(raw: buffer.baseAddress!)
        let count = buffer.count
        let r = await preadFull(p, count, offset)
        switch r {
        case .success(let n):
            // Past end of file reads as zeros (the file may be shorter than a format expects).
            if n < count { memset(p.raw + n, 0, count - n) }
        case .failure(let e):
            throw BlockError.system(e.rawValue, "read", path: filename, offset: offset)
        }
    }

    private func bouncedRead(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws {
        let a = Int64(directAlignment)
        let start = offset / a * a
        let end = (offset + Int64(buffer.count) + a - 1) / a * a
        let bounce = AlignedBuffer(count: Int(end - start), alignment: directAlignment)
        // SAFETY: `bounce` spans `start..<end`, which contains `offset..<offset+buffer.count`, so the
        // rebased slice is in bounds; it stays alive for the closure.
        try await bounce.withUnsafeMutableBytes { b in
            try await self.readAdmitted(at: start, into: b)
            buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: b[Int(offset - start)..<Int(offset - start) + buffer.count]))
        }
    }

    /// Writes `buffer` at `offset` with pwrite(2), growing the file if needed; `.fua` flushes
    /// afterwards. Unaligned `O_DIRECT` writes are read-modify-written under a lock.
    /// - Throws: ``BlockError`` `.closed` after ``close()``, `.readOnly`, `.noSpace`, or an I/O error.
    public func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags) async throws {
        try await gate.run(filename, "write") { try await writeAdmitted(at: offset, from: buffer, flags: flags) }
    }

    /// ``write(at:from:flags:)`` for a request already admitted by the gate.
    private func writeAdmitted(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags) async throws {
        try checkWritable("write")
        guard buffer.count > 0 else { return }
        if !isAligned(offset, buffer.count, buffer.baseAddress) {
            try await bouncedWrite(at: offset, from: buffer, flags: flags)
            return
        }
        let p = SendablePointer(raw: UnsafeMutableRawPointer(mutating: buffer.baseAddress!))
        let count = buffer.count
        let r = await pwriteFull(p, count, offset)
        if case .failure(let e) = r {
            throw BlockError.system(e.rawValue, "write", path: filename, offset: offset)
        }
        noteExtent(offset + Int64(count))
        if flags.contains(.fua) || cacheMode.writeThrough { try await sync() }
    }

    private func bouncedWrite(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags) async throws {
        let a = Int64(directAlignment)
        let start = offset / a * a
        let end = (offset + Int64(buffer.count) + a - 1) / a * a
        let bounce = AlignedBuffer(count: Int(end - start), alignment: directAlignment)
        try await rmwLock.withLock {
            // SAFETY: `bounce` spans the aligned range around the write, so every slice below is in
            // bounds; it stays alive for the closure.
            try await bounce.withUnsafeMutableBytes { b in
                if start != offset || end != offset + Int64(buffer.count) {
                    try await self.readAdmitted(at: start, into: b)
                }
                UnsafeMutableRawBufferPointer(rebasing: b[Int(offset - start)...]).copyMemory(from: buffer)
                try await self.writeAdmitted(at: start, from: UnsafeRawBufferPointer(b), flags: flags)
            }
        }
    }

    private func noteExtent(_ end: Int64) {
        sizeLock.withLock { if end > cachedLength && !isBlockDevice { cachedLength = end } }
    }

    // MARK: Zeroes, discard, flush

    /// Makes `length` bytes at `offset` read as zeroes: with `.mayUnmap` a punched hole, else
    /// `FALLOC_FL_ZERO_RANGE`, else writes of zeroes unless `.noFallback` forbids it (QEMU's
    /// `raw_co_pwrite_zeroes`).
    /// - Throws: ``BlockError`` `.closed` after ``close()``, `.readOnly`, `.unsupported` with `.noFallback` when no fast way exists, or an I/O error.
    public func writeZeroes(at offset: Int64, length: Int64, flags: WriteFlags) async throws {
        try await gate.run(filename, "write zeroes") { try await writeZeroesAdmitted(at: offset, length: length, flags: flags) }
    }

    private func writeZeroesAdmitted(at offset: Int64, length: Int64, flags: WriteFlags) async throws {
        try checkWritable("write zeroes")
        guard length > 0 else { return }
        let fd = self.fd
        let curLen = self.length
        if !isBlockDevice {
            if flags.contains(.mayUnmap) && supportsPunchHole && offset + length <= curLen {
                let mode = qb_falloc_punch_hole() | qb_falloc_keep_size()
                let r = await pool.run { Syscalls.fallocate(fd, mode, offset, length) }
                if case .success = r { return }
                supportsPunchHole = false
            }
            if supportsZeroRange {
                let r = await pool.run { Syscalls.fallocate(fd, qb_falloc_zero_range(), offset, length) }
                switch r {
                case .success:
                    noteExtent(offset + length)
                    if flags.contains(.fua) || cacheMode.writeThrough { try await sync() }
                    return
                case .failure(let e) where e.rawValue == ENOSPC:
                    throw BlockError.system(e.rawValue, "write zeroes", path: filename, offset: offset)
                case .failure:
                    supportsZeroRange = false
                }
            }
            if offset >= curLen {
                // Beyond end of file: extending the file reads as zeros.
                if case .failure(let e) = await pool.run({ Syscalls.ftruncate(fd, offset + length) }) {
                    throw BlockError.system(e.rawValue, "write zeroes", path: filename, offset: offset)
                }
                noteExtent(offset + length)
                return
            }
        }
        if flags.contains(.noFallback) {
            throw BlockError(.unsupported, "write zeroes cannot be done efficiently", errno: ENOTSUP, path: filename, offset: offset)
        }
        // Fallback: write a zero buffer.
        let chunk = Int(min(length, 1 << 20))
        let zeros = AlignedBuffer(count: chunk, alignment: max(directAlignment, 512))
        var pos = offset
        while pos < offset + length {
            let n = Int(min(Int64(chunk), offset + length - pos))
            // SAFETY: `zeros` is kept alive by the async closure; every write takes at most
            // `zeros.count` bytes from it.
            try await zeros.withUnsafeBytes { b in
                try await self.writeAdmitted(at: pos, from: UnsafeRawBufferPointer(rebasing: b[0..<n]), flags: [])
            }
            pos += Int64(n)
        }
        if flags.contains(.fua) { try await sync() }
    }

    /// Punches a hole over `length` bytes at `offset` (`FALLOC_FL_PUNCH_HOLE`); on a block
    /// device or a file system that cannot do it this is a no-op (discard is advisory, as in QEMU).
    /// - Throws: ``BlockError`` `.closed` after ``close()``, `.readOnly`, or an I/O error.
    public func discard(at offset: Int64, length: Int64) async throws {
        try await gate.run(filename, "discard") { try await discardAdmitted(at: offset, length: length) }
    }

    private func discardAdmitted(at offset: Int64, length: Int64) async throws {
        try checkWritable("discard")
        guard length > 0, !isBlockDevice, supportsPunchHole else { return }
        let fd = self.fd
        let mode = qb_falloc_punch_hole() | qb_falloc_keep_size()
        let r = await pool.run { Syscalls.fallocate(fd, mode, offset, length) }
        if case .failure = r { supportsPunchHole = false }
    }

    /// fdatasync(2); does nothing for a read-only node or a cache mode that ignores flushes
    /// (`unsafe`).
    /// - Throws: ``BlockError`` `.closed` after ``close()``, or an I/O error.
    public func flush() async throws {
        try await gate.run(filename, "flush") {
            if cacheMode.ignoresFlush || isReadOnly { return }
            try await sync()
        }
    }

    /// fdatasync; only for a request admitted by the gate.
    private func sync() async throws {
        let fd = self.fd
        if let ring = IORing.shared, !Syscalls.intercepts(fd) {
            while true {
                let r = await ring.perform(.fdatasync, fd: fd, buffer: nil, count: 0, offset: 0)
                if r == 0 { return }
                if r == -EINTR || r == -EAGAIN { continue }
                if r == -EBUSY || r == -EINVAL || r == -EOPNOTSUPP { break }
                throw BlockError.system(-r, "flush", path: filename)
            }
        }
        if case .failure(let e) = await pool.run({ Syscalls.fdatasync(fd) }) {
            throw BlockError.system(e.rawValue, "flush", path: filename)
        }
    }

    // MARK: Positional I/O: io_uring when the kernel has it, else the thread pool

    /// Reads until `count` bytes or end of file; returns the bytes read.
    private func preadFull(_ p: SendablePointer, _ count: Int, _ offset: Int64) async -> Result<Int, Syscalls.Errno> {
        let fd = self.fd
        var done = 0
        if let ring = IORing.shared, !Syscalls.intercepts(fd) {
            while done < count {
                let n = min(count - done, 1 << 30)
                let r = await ring.perform(.read, fd: fd, buffer: p.raw + done, count: n, offset: offset + Int64(done))
                if r > 0 { done += Int(r); continue }
                if r == 0 { return .success(done) }
                if r == -EINTR || r == -EAGAIN { continue }
                if r == -EBUSY || r == -EOPNOTSUPP { break }
                return .failure(Syscalls.Errno(-r))
            }
            if done == count { return .success(done) }
        }
        let rest = SendablePointer(raw: p.raw + done)
        let start = done
        return await pool.run { Syscalls.pread(fd, rest.raw, count - start, offset + Int64(start)) }.map { $0 + start }
    }

    /// Writes all of `count` bytes.
    private func pwriteFull(_ p: SendablePointer, _ count: Int, _ offset: Int64) async -> Result<Int, Syscalls.Errno> {
        if let serialWrites { return await serialWrites.write(p, count, offset) }
        let fd = self.fd
        var done = 0
        if let ring = IORing.shared, !Syscalls.intercepts(fd) {
            while done < count {
                let n = min(count - done, 1 << 30)
                let r = await ring.perform(.write, fd: fd, buffer: p.raw + done, count: n, offset: offset + Int64(done))
                if r > 0 { done += Int(r); continue }
                if r == -EINTR || r == -EAGAIN { continue }
                if r == -EBUSY || r == -EOPNOTSUPP { break }
                if r == 0 { return .failure(Syscalls.Errno(EIO)) }
                return .failure(Syscalls.Errno(-r))
            }
            if done == count { return .success(done) }
        }
        let rest = SendablePointer(raw: p.raw + done)
        let start = done
        return await pool.run { Syscalls.pwrite(fd, rest.raw, count - start, offset + Int64(start)) }.map { $0 + start }
    }

    // MARK: Block status

    /// Whether the run at `offset` (up to `length` bytes) is data or a hole, from
    /// `SEEK_DATA`/`SEEK_HOLE` (QEMU's `raw_co_block_status`); holes read as zeroes, and
    /// everything is allocated at this layer.
    /// - Throws: ``BlockError`` `.closed` after ``close()``, or an I/O error.
    public func blockStatus(at offset: Int64, length: Int64) async throws -> BlockStatus {
        try await gate.run(filename, "block status") { try await blockStatusAdmitted(at: offset, length: length) }
    }

    private func blockStatusAdmitted(at offset: Int64, length: Int64) async throws -> BlockStatus {
        let fileLength = self.length
        if isBlockDevice || offset >= fileLength {
            // Beyond end of file reads as zeros; a block device is all data.
            let flags: BlockStatus.Flags = isBlockDevice ? [.data, .allocated] : [.zero, .allocated]
            return BlockStatus(flags: flags, length: length, hostOffset: offset)
        }
        let fd = self.fd
        let maxLen = min(length, fileLength - offset)
        let r: (Int64, Bool)? = await pool.run {
            switch Syscalls.lseek(fd, offset, qb_seek_data()) {
            case .failure(let e):
                if e.rawValue == ENXIO { return (maxLen, false) } // hole to end of file
                return nil
            case .success(let data):
                if data > offset { return (min(data - offset, maxLen), false) }
                switch Syscalls.lseek(fd, offset, qb_seek_hole()) {
                case .success(let hole): return (min(max(hole - offset, 1), maxLen), true)
                case .failure: return nil
                }
            }
        }
        guard let (n, isData) = r else {
            return BlockStatus(flags: [.data, .allocated], length: maxLen, hostOffset: offset)
        }
        return BlockStatus(flags: isData ? [.data, .allocated] : [.zero, .allocated], length: n, hostOffset: offset)
    }

    // MARK: Size

    /// Resizes the file to `newLength` bytes with ftruncate(2), preallocating the new area as
    /// `preallocation` asks (`falloc`: fallocate, `full`: written zeroes); a block device can
    /// only be "resized" to a size no larger than it is.
    /// - Throws: ``BlockError`` `.closed` after ``close()``, `.readOnly`, `.unsupported`, `.noSpace`, or an I/O error.
    public func truncate(to newLength: Int64, preallocation: Preallocation) async throws {
        try await gate.run(filename, "truncate") { try await truncateAdmitted(to: newLength, preallocation: preallocation) }
    }

    private func truncateAdmitted(to newLength: Int64, preallocation: Preallocation) async throws {
        try checkWritable("truncate")
        if isBlockDevice {
            if newLength > length {
                throw BlockError(.unsupported, "Cannot grow device files", path: filename, operation: "truncate")
            }
            return
        }
        let fd = self.fd
        let old = length
        if case .failure(let e) = await pool.run({ Syscalls.ftruncate(fd, newLength) }) {
            throw BlockError.system(e.rawValue, "truncate", path: filename)
        }
        sizeLock.withLock { cachedLength = newLength }
        if newLength > old {
            switch preallocation {
            case .off, .metadata: break
            case .falloc:
                if case .failure(let e) = await pool.run({ Syscalls.fallocate(fd, 0, old, newLength - old) }) {
                    throw BlockError.system(e.rawValue, "preallocate", path: filename)
                }
            case .full:
                try await writeZeroesExplicitly(from: old, to: newLength)
            }
        }
    }

    private func writeZeroesExplicitly(from start: Int64, to end: Int64) async throws {
        let chunk = 1 << 20
        let zeros = AlignedBuffer(count: chunk, alignment: max(directAlignment, 512))
        var pos = start
        while pos < end {
            let n = Int(min(Int64(chunk), end - pos))
            // SAFETY: `zeros` is kept alive by the async closure; every write takes at most
            // `zeros.count` bytes from it.
            try await zeros.withUnsafeBytes { b in
                try await self.writeAdmitted(at: pos, from: UnsafeRawBufferPointer(rebasing: b[0..<n]), flags: [])
            }
            pos += Int64(n)
        }
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

extension FileNode {
    /// Takes QEMU-compatible image locks for `perm`/`shared` (after the node was opened
    /// with `locking: false`, once the format above it is known).
    public func lock(perm: BlockPermissions, shared: BlockPermissions) throws {
        try gate.runSync(filename, "lock") {
            try ImageLock.acquire(fd: fd, path: filename, perm: perm, shared: shared)
            sizeLock.withLock { mode.locked = (perm, shared) }
        }
    }

    /// Reads up to `count` bytes at `offset` synchronously on the caller's thread.
    /// Only for probing a few header bytes at open time.
    package func probeBytes(count: Int) -> [UInt8] {
        guard gate.tryEnter() else { return [] }
        defer { gate.leave() }
        var buf = [UInt8](repeating: 0, count: count)
        // SAFETY: `buf` has `count` bytes and pread is told `count`.
        let n: Int = buf.withUnsafeMutableBytes { b in
            if case .success(let n) = Syscalls.pread(fd, b.baseAddress!, count, 0) { return n }
            return 0
        }
        return Array(buf[0..<n])
    }
}

extension FileNode: SynchronousWriteTarget {
    /// Writes on the calling thread, straight to the descriptor (for a format node's last
    /// chance write-back in `deinit`, which cannot await). Refused like any call once closed;
    /// an `O_DIRECT` request that is not aligned is refused too (there is no bounce here).
    package func writeSynchronously(at offset: Int64, from buffer: UnsafeRawBufferPointer) throws {
        try gate.runSync(filename, "write") {
            try checkWritable("write")
            guard buffer.count > 0 else { return }
            guard isAligned(offset, buffer.count, buffer.baseAddress) else {
                throw BlockError(.invalidArgument, "Unaligned O_DIRECT write", errno: EINVAL, path: filename,
                                 offset: offset, operation: "write")
            }
            if case .failure(let e) = Syscalls.pwrite(fd, buffer.baseAddress!, buffer.count, offset) {
                throw BlockError.system(e.rawValue, "write", path: filename, offset: offset)
            }
            noteExtent(offset + Int64(buffer.count))
        }
    }

    /// fdatasync on the calling thread.
    package func syncSynchronously() throws {
        try gate.runSync(filename, "flush") {
            if isReadOnly { return }
            if case .failure(let e) = Syscalls.fdatasync(fd) {
                throw BlockError.system(e.rawValue, "flush", path: filename)
            }
        }
    }
}
