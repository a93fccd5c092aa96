#if canImport(Glibc)
import Glibc
#endif
import CSupport
import QBlockCore
import QBlockGraph

/// Reads, writes and flushes: positional I/O through io_uring or the thread pool, bounced
/// through aligned buffers under `O_DIRECT`.
extension FileNode {
    // MARK: Read and write

    /// Reads `buffer.count` bytes at `offset` with pread(2); bytes past the end of file read
    /// as zeroes. Unaligned requests under `O_DIRECT` go through an aligned bounce buffer.
    /// - Throws: ``BlockError`` `.closed` after ``close()``, or an I/O error (`.io` with the errno).
    public func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws {
        try await gate.run(filename, "read") { try await readAdmitted(at: offset, into: buffer) }
    }

    /// ``read(at:into:)`` for a request already admitted by the gate.
    func readAdmitted(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws {
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

    func bouncedRead(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws {
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
    /// afterwards. Unaligned `O_DIRECT` writes are read-modify-written, holding their aligned
    /// blocks against every overlapping request (``RangeSerializer``).
    /// - Throws: ``BlockError`` `.closed` after ``close()``, `.readOnly`, `.noSpace`, or an I/O error.
    public func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags) async throws {
        try await gate.run(filename, "write") { try await writeAdmitted(at: offset, from: buffer, flags: flags) }
    }

    /// ``write(at:from:flags:)`` for a request already admitted by the gate.
    func writeAdmitted(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags) async throws {
        try checkWritable("write")
        guard buffer.count > 0 else { return }
        if directAlignment <= 1 {
            try await writeAligned(at: offset, from: buffer, flags: flags)
            return
        }
        if !isAligned(offset, buffer.count, buffer.baseAddress) {
            try await bouncedWrite(at: offset, from: buffer, flags: flags)
            return
        }
        try await inflight.withRange(offset..<(offset + Int64(buffer.count)), exclusive: false) {
            try await writeAligned(at: offset, from: buffer, flags: flags)
        }
    }

    /// One pwrite of an aligned request (any request without O_DIRECT), ordered by the caller.
    func writeAligned(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags) async throws {
        let p = SendablePointer(raw: UnsafeMutableRawPointer(mutating: buffer.baseAddress!))
        let count = buffer.count
        let r = await pwriteFull(p, count, offset)
        if case .failure(let e) = r {
            throw BlockError.system(e.rawValue, "write", path: filename, offset: offset)
        }
        noteExtent(offset + Int64(count))
        if flags.contains(.fua) || cacheMode.writeThrough { try await sync() }
    }

    /// An O_DIRECT write through an aligned bounce buffer: a read-modify-write of the aligned
    /// blocks around an unaligned range (holding them exclusively), or a plain copy when only
    /// the memory was misaligned.
    func bouncedWrite(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags) async throws {
        let a = Int64(directAlignment)
        let start = offset / a * a
        let end = (offset + Int64(buffer.count) + a - 1) / a * a
        let partial = start != offset || end != offset + Int64(buffer.count)
        let bounce = AlignedBuffer(count: Int(end - start), alignment: directAlignment)
        try await inflight.withRange(start..<end, exclusive: partial) {
            // SAFETY: `bounce` spans the aligned range around the write, so every slice below is in
            // bounds; it stays alive for the closure.
            try await bounce.withUnsafeMutableBytes { b in
                if partial {
                    try await self.readAdmitted(at: start, into: b)
                }
                UnsafeMutableRawBufferPointer(rebasing: b[Int(offset - start)...]).copyMemory(from: buffer)
                try await self.writeAligned(at: start, from: UnsafeRawBufferPointer(b), flags: flags)
            }
        }
    }

    // MARK: Positional I/O: io_uring when the kernel has it, else the thread pool

    /// Reads until `count` bytes or end of file; returns the bytes read.
    func preadFull(_ p: SendablePointer, _ count: Int, _ offset: Int64) async -> Result<Int, Syscalls.Errno> {
        let fd = self.fd
        var done = 0
        if let ring = self.ring, !Syscalls.intercepts(fd) {
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
    func pwriteFull(_ p: SendablePointer, _ count: Int, _ offset: Int64) async -> Result<Int, Syscalls.Errno> {
        if let serialWrites { return await serialWrites.write(p, count, offset) }
        let fd = self.fd
        var done = 0
        if let ring = self.ring, !Syscalls.intercepts(fd) {
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

    /// Reads up to `count` bytes at offset 0 synchronously on the caller's thread (fewer for
    /// a shorter file, none when the read fails). Only for probing a few header bytes at
    /// open time. Under `O_DIRECT` the read goes through an aligned buffer of whole aligned
    /// blocks, as the kernel requires (an unaligned read failed, and a qcow2 image opened
    /// with `cache=none` and no format probed as raw).
    package func probeBytes(count: Int) -> [UInt8] {
        guard count > 0, gate.tryEnter() else { return [] }
        defer { gate.leave() }
        let a = directAlignment
        let buf = AlignedBuffer(count: (count + a - 1) / a * a, alignment: max(a, 512))
        // SAFETY: `buf` has `buf.count` bytes and pread is told `buf.count`.
        return buf.withUnsafeMutableBytes { b -> [UInt8] in
            guard case .success(let n) = Syscalls.pread(fd, b.baseAddress!, b.count, 0) else { return [] }
            return Array(b[0..<min(n, count)])
        }
    }
}
