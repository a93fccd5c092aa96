#if canImport(Glibc)
import Glibc
#endif
import CSupport
import QBlockCore
import QBlockGraph
import Synchronization

/// Write-zeroes, discard and truncate: `fallocate` (zero range, punch hole) and
/// `ftruncate`, with QEMU's fallbacks.
extension FileNode {
    // MARK: Zeroes, discard, flush

    /// Makes `length` bytes at `offset` read as zeroes: with `.mayUnmap` a punched hole, else
    /// `FALLOC_FL_ZERO_RANGE`, else writes of zeroes unless `.noFallback` forbids it (QEMU's
    /// `raw_co_pwrite_zeroes`).
    /// - Throws: ``BlockError`` `.closed` after ``close()``, `.readOnly`, `.unsupported` with `.noFallback` when no fast way exists, or an I/O error.
    public func writeZeroes(at offset: Int64, length: Int64, flags: WriteFlags) async throws {
        try await gate.run(filename, "write zeroes") { try await writeZeroesAdmitted(at: offset, length: length, flags: flags) }
    }

    func writeZeroesAdmitted(at offset: Int64, length: Int64, flags: WriteFlags) async throws {
        try checkWritable("write zeroes")
        guard length > 0 else { return }
        // With O_DIRECT, ordered against read-modify-writes of the same blocks (the fallback
        // below goes through writeAdmitted, which orders each write itself).
        let done = directAlignment > 1
            ? try await inflight.withRange(offset..<(offset + length), exclusive: false) {
                try await zeroInPlace(at: offset, length: length, flags: flags)
            }
            : try await zeroInPlace(at: offset, length: length, flags: flags)
        if done { return }
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

    /// Zeroes with `fallocate` (punching a hole with `.mayUnmap`) or by extending the file;
    /// false when only writing zeroes can do it.
    private func zeroInPlace(at offset: Int64, length: Int64, flags: WriteFlags) async throws -> Bool {
        guard !isBlockDevice else { return false }
        let fd = self.fd
        let curLen = self.length
        if flags.contains(.mayUnmap) && supportsPunchHole.load(ordering: .relaxed) && offset + length <= curLen {
            let mode = qb_falloc_punch_hole() | qb_falloc_keep_size()
            let r = await pool.run { Syscalls.fallocate(fd, mode, offset, length) }
            if case .success = r { return true }
            supportsPunchHole.store(false, ordering: .relaxed)
        }
        if supportsZeroRange.load(ordering: .relaxed) {
            let r = await pool.run { Syscalls.fallocate(fd, qb_falloc_zero_range(), offset, length) }
            switch r {
            case .success:
                noteExtent(offset + length)
                if flags.contains(.fua) || cacheMode.writeThrough { try await sync() }
                return true
            case .failure(let e) where e.rawValue == ENOSPC:
                throw BlockError.system(e.rawValue, "write zeroes", path: filename, offset: offset)
            case .failure:
                supportsZeroRange.store(false, ordering: .relaxed)
            }
        }
        if offset >= curLen {
            // Beyond end of file: extending the file reads as zeros.
            if case .failure(let e) = await pool.run({ Syscalls.ftruncate(fd, offset + length) }) {
                throw BlockError.system(e.rawValue, "write zeroes", path: filename, offset: offset)
            }
            noteExtent(offset + length)
            return true
        }
        return false
    }

    /// Punches a hole over `length` bytes at `offset` (`FALLOC_FL_PUNCH_HOLE`); on a block
    /// device or a file system that cannot do it this is a no-op (discard is advisory, as in QEMU).
    /// - Throws: ``BlockError`` `.closed` after ``close()``, `.readOnly`, or an I/O error.
    public func discard(at offset: Int64, length: Int64) async throws {
        try await gate.run(filename, "discard") { try await discardAdmitted(at: offset, length: length) }
    }

    func discardAdmitted(at offset: Int64, length: Int64) async throws {
        try checkWritable("discard")
        guard length > 0, !isBlockDevice, supportsPunchHole.load(ordering: .relaxed) else { return }
        let fd = self.fd
        let mode = qb_falloc_punch_hole() | qb_falloc_keep_size()
        let r = directAlignment > 1
            ? await inflight.withRange(offset..<(offset + length), exclusive: false) { await pool.run { Syscalls.fallocate(fd, mode, offset, length) } }
            : await pool.run { Syscalls.fallocate(fd, mode, offset, length) }
        if case .failure = r { supportsPunchHole.store(false, ordering: .relaxed) }
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
    func sync() async throws {
        let fd = self.fd
        if let ring = self.ring, !Syscalls.intercepts(fd) {
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

    // MARK: Size

    /// Resizes the file to `newLength` bytes with ftruncate(2), preallocating the new area as
    /// `preallocation` asks (`falloc`: fallocate, `full`: written zeroes); a block device can
    /// only be "resized" to a size no larger than it is.
    /// - Throws: ``BlockError`` `.closed` after ``close()``, `.readOnly`, `.unsupported`, `.noSpace`, or an I/O error.
    public func truncate(to newLength: Int64, preallocation: Preallocation) async throws {
        try await gate.run(filename, "truncate") { try await truncateAdmitted(to: newLength, preallocation: preallocation) }
    }

    func truncateAdmitted(to newLength: Int64, preallocation: Preallocation) async throws {
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

    func writeZeroesExplicitly(from start: Int64, to end: Int64) async throws {
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
}
