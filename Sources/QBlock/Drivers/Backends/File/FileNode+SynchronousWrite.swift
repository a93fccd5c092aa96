#if canImport(Glibc)
import Glibc
#endif
import CSupport
import QBlockCore
import QBlockGraph

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
