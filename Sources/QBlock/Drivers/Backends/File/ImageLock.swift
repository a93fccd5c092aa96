#if canImport(Glibc)
import Glibc
#endif
import CSupport
import QBlockCore
import QBlockGraph

/// QEMU-compatible image locking.
///
/// QEMU's file driver expresses what a process does with an image (its permissions) and
/// what it lets others do (the shared permissions) as open-file-description read locks
/// on single bytes of the image file: byte 100+bit for each permission held, byte 200+bit
/// for each permission *not* shared. A process may take a permission only if nobody locks
/// 200+bit, and may refuse to share one only if nobody locks 100+bit. Using the same bytes
/// makes QEMU and these tools see each other's claims.
struct ImageLock {
    static let permBase: Int64 = 100
    static let sharedBase: Int64 = 200

    /// Takes the locks for `perm`/`shared` on `fd` and checks others' locks.
    /// - Throws: ``BlockError`` with code `.locked` naming the conflicting permission.
    static func acquire(fd: Int32, path: String, perm: BlockPermissions, shared: BlockPermissions) throws {
        for (bit, _) in BlockPermissions.names {
            let idx = Int64(bit.rawValue.trailingZeroBitCount)
            if perm.contains(bit) {
                let r = qb_ofd_lock(fd, permBase + idx, 0)
                if r < 0 { throw lockError(-r, path) }
            }
            if !shared.contains(bit) {
                let r = qb_ofd_lock(fd, sharedBase + idx, 0)
                if r < 0 { throw lockError(-r, path) }
            }
        }
        for (bit, name) in BlockPermissions.names {
            let idx = Int64(bit.rawValue.trailingZeroBitCount)
            if perm.contains(bit), qb_ofd_test(fd, sharedBase + idx, 1) == 1 {
                release(fd: fd)
                throw BlockError(.locked, "Failed to get \"\(name)\" lock\nIs another process using the image [\(path)]?",
                                 path: path, operation: "lock")
            }
            if !shared.contains(bit), qb_ofd_test(fd, permBase + idx, 1) == 1 {
                release(fd: fd)
                throw BlockError(.locked, "Failed to get shared \"\(name)\" lock\nIs another process using the image [\(path)]?",
                                 path: path, operation: "lock")
            }
        }
    }

    static func release(fd: Int32) {
        for (bit, _) in BlockPermissions.names {
            let idx = Int64(bit.rawValue.trailingZeroBitCount)
            _ = qb_ofd_unlock(fd, permBase + idx)
            _ = qb_ofd_unlock(fd, sharedBase + idx)
        }
    }

    private static func lockError(_ err: Int32, _ path: String) -> BlockError {
        BlockError(.locked, "Failed to lock byte: \(BlockError.strerror(err))", errno: err, path: path, operation: "lock")
    }
}
