#if canImport(Glibc)
import Glibc
#endif
import CSupport
import QBlockCore
import QBlockGraph

/// Image locks and reopening: the descriptor and the mode it was opened with change
/// together, and the locks move with them.
extension FileNode {
    /// Takes QEMU-compatible image locks for `perm`/`shared` (after the node was opened
    /// with `locking: false`, once the format above it is known).
    public func lock(perm: BlockPermissions, shared: BlockPermissions) throws {
        try gate.runSync(filename, "lock") {
            try ImageLock.acquire(fd: fd, path: filename, perm: perm, shared: shared)
            sizeLock.withLock { mode.locked = (perm, shared) }
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

    func reopenAdmitted(readOnly: Bool, cache: CacheMode) throws {
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
}
