#if canImport(Glibc)
import Glibc
#endif
import Foundation
import QBlockCore
import QBlockGraph
import QBlockNBDWire

/// Reads, writes and flush, split to the server's maximum payload and widened to its
/// minimum block size.
extension NBDClientNode {
    func checkWritable(_ op: String) throws {
        if isReadOnly {
            throw BlockError(.readOnly, "Permission denied: NBD export is read-only", errno: EPERM, path: filename, operation: op)
        }
    }

    /// Reads `buffer.count` bytes at `offset` with NBD_CMD_READ, split to the server's maximum
    /// block size; bytes past the end of the export read as zeroes.
    /// - Throws: ``BlockError`` `.closed` after ``close()``, or `.io` when the server replies with an error or the connection is lost.
    public func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws {
        try await gate.run(filename, "read") { try await readAdmitted(at: offset, into: buffer) }
    }

    func readAdmitted(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws {
        guard buffer.count > 0, let base = buffer.baseAddress else { return }
        let size = length
        // Past the end of the export reads as zeros (a format may read a little beyond).
        let inside = Int(max(0, min(Int64(buffer.count), size - offset)))
        if inside < buffer.count { memset(base + inside, 0, buffer.count - inside) }
        if inside == 0 { return }
        let a = minBlock
        if a > 1 && (offset % a != 0 || Int64(inside) % a != 0) {
            let start = offset / a * a
            let end = min((offset + Int64(inside) + a - 1) / a * a, size)
            let bounce = AlignedBuffer(count: Int(end - start))
            // SAFETY: `bounce` covers the aligned range around the request; the async closure keeps it
            // alive until the reply has been copied.
            try await bounce.withUnsafeMutableBytes { b in
                try await self.readAligned(at: start, into: b.baseAddress!, count: b.count)
                base.copyMemory(from: b.baseAddress! + Int(offset - start), byteCount: inside)
            }
            return
        }
        try await readAligned(at: offset, into: base, count: inside)
    }

    func readAligned(at offset: Int64, into base: UnsafeMutableRawPointer, count: Int) async throws {
        var done = 0
        while done < count {
            let n = Int(min(Int64(count - done), maxPayload))
            try await perform(.read, offset: offset + Int64(done), length: n, into: base + done, operation: "read")
            done += n
        }
    }

    /// Writes `buffer` at `offset` with NBD_CMD_WRITE (`.fua` sets NBD_CMD_FLAG_FUA), split to
    /// the server's maximum block size.
    /// - Throws: ``BlockError`` `.closed` after ``close()``, `.readOnly`, or `.io` on a server error or lost connection.
    public func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags) async throws {
        try await gate.run(filename, "write") { try await writeAdmitted(at: offset, from: buffer, flags: flags) }
    }

    func writeAdmitted(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags) async throws {
        try checkWritable("write")
        guard buffer.count > 0, let base = buffer.baseAddress else { return }
        try checkRange(offset, Int64(buffer.count), "write")
        let a = minBlock
        if a > 1 && (offset % a != 0 || Int64(buffer.count) % a != 0) {
            let start = offset / a * a
            let end = (offset + Int64(buffer.count) + a - 1) / a * a
            let bounce = AlignedBuffer(count: Int(end - start))
            // The blocks around the write are held against every overlapping request while
            // their stale copy is in flight (RangeSerializer).
            try await serializer.withRange(start..<end, exclusive: true) {
                // SAFETY: `bounce` covers the aligned range around the write; the async closure keeps
                // it alive across the read-modify-write.
                try await bounce.withUnsafeMutableBytes { b in
                    try await self.readAligned(at: start, into: b.baseAddress!, count: b.count)
                    (b.baseAddress! + Int(offset - start)).copyMemory(from: base, byteCount: buffer.count)
                    try await self.writeAligned(at: start, from: UnsafeRawPointer(b.baseAddress!), count: b.count, flags: flags)
                }
            }
            return
        }
        if a > 1 {
            try await serializer.withRange(offset..<(offset + Int64(buffer.count)), exclusive: false) {
                try await writeAligned(at: offset, from: base, count: buffer.count, flags: flags)
            }
            return
        }
        try await writeAligned(at: offset, from: base, count: buffer.count, flags: flags)
    }

    func checkRange(_ offset: Int64, _ count: Int64, _ op: String) throws {
        if offset < 0 || offset + count > length {
            throw BlockError(.noSpace, "Request beyond the end of the NBD export (\(length) bytes)", errno: ENOSPC,
                             path: filename, offset: offset, operation: op)
        }
    }

    func commandFlags(_ flags: WriteFlags) -> NBD.CommandFlags {
        flags.contains(.fua) && info.flags.contains(.sendFUA) ? [.fua] : []
    }

    /// Flushes after a FUA request the server could not take with the FUA flag.
    func emulateFUA(_ flags: WriteFlags) async throws {
        if flags.contains(.fua) && !info.flags.contains(.sendFUA) { try await flushAdmitted() }
    }

    func writeAligned(at offset: Int64, from base: UnsafeRawPointer, count: Int, flags: WriteFlags) async throws {
        var done = 0
        while done < count {
            let n = Int(min(Int64(count - done), maxPayload))
            try await perform(.write, flags: commandFlags(flags), offset: offset + Int64(done), length: n,
                              payload: base + done, operation: "write")
            done += n
        }
        try await emulateFUA(flags)
    }

    /// Sends NBD_CMD_FLUSH; does nothing for a read-only node or a server without flush.
    /// - Throws: ``BlockError`` `.closed` after ``close()``, or `.io`.
    public func flush() async throws {
        try await gate.run(filename, "flush") { try await flushAdmitted() }
    }

    func flushAdmitted() async throws {
        guard !isReadOnly, info.flags.contains(.sendFlush) else { return }
        try await perform(.flush, offset: 0, length: 0, operation: "flush")
    }
}
