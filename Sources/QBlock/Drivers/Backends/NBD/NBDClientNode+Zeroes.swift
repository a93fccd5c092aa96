#if canImport(Glibc)
import Glibc
#endif
import Foundation
import QBlockCore
import QBlockGraph
import QBlockNBDWire

/// Write-zeroes and discard (NBD_CMD_WRITE_ZEROES, NBD_CMD_TRIM).
extension NBDClientNode {
    /// Makes `length` bytes at `offset` read as zeroes with NBD_CMD_WRITE_ZEROES (`.mayUnmap`
    /// clears NO_HOLE, `.noFallback` needs NBD_CMD_FLAG_FAST_ZERO), else by writing zeroes.
    /// - Throws: ``BlockError`` `.closed` after ``close()``, `.readOnly`, `.unsupported` with `.noFallback` when the server cannot zero fast,
    ///   or `.io`.
    public func writeZeroes(at offset: Int64, length: Int64, flags: WriteFlags) async throws {
        try await gate.run(filename, "write zeroes") { try await writeZeroesAdmitted(at: offset, length: length, flags: flags) }
    }

    func writeZeroesAdmitted(at offset: Int64, length: Int64, flags: WriteFlags) async throws {
        try checkWritable("write zeroes")
        guard length > 0 else { return }
        try checkRange(offset, length, "write zeroes")
        let canZero = info.flags.contains(.sendWriteZeroes)
        if flags.contains(.noFallback) && !(canZero && info.flags.contains(.sendFastZero)) {
            throw BlockError(.unsupported, "write zeroes cannot be done efficiently", errno: ENOTSUP, path: filename,
                             offset: offset, operation: "write zeroes")
        }
        let a = minBlock
        let alignedStart = (offset + a - 1) / a * a
        let alignedEnd = (offset + length) / a * a
        if !canZero || alignedEnd <= alignedStart {
            try await writeZeroBuffers(at: offset, length: length, flags: flags)
            return
        }
        if alignedStart > offset { try await writeZeroBuffers(at: offset, length: alignedStart - offset, flags: flags) }
        var cflags = commandFlags(flags)
        if !flags.contains(.mayUnmap) { cflags.insert(.noHole) }
        if flags.contains(.noFallback) { cflags.insert(.fastZero) }
        // (Ordered against read-modify-writes of the same blocks, as writes are.)
        try await serializer.withRange(alignedStart..<alignedEnd, exclusive: false) {
            var pos = alignedStart
            while pos < alignedEnd {
                let n = min(alignedEnd - pos, maxNoPayload)
                try await perform(.writeZeroes, flags: cflags, offset: pos, length: Int(n), operation: "write zeroes")
                pos += n
            }
        }
        if offset + length > alignedEnd {
            try await writeZeroBuffers(at: alignedEnd, length: offset + length - alignedEnd, flags: flags)
        }
        try await emulateFUA(flags)
    }

    func writeZeroBuffers(at offset: Int64, length: Int64, flags: WriteFlags) async throws {
        let chunk = Int(min(length, maxPayload))
        let zeros = AlignedBuffer(count: chunk)
        var pos = offset
        while pos < offset + length {
            let n = Int(min(Int64(chunk), offset + length - pos))
            // SAFETY: `zeros` is kept alive by the async closure; every write takes at most
            // `zeros.count` bytes from it.
            try await zeros.withUnsafeBytes { b in
                try await self.writeAdmitted(at: pos, from: UnsafeRawBufferPointer(rebasing: b[0..<n]), flags: flags)
            }
            pos += Int64(n)
        }
    }

    /// Sends NBD_CMD_TRIM for the range; does nothing when the server does not support trim
    /// (discard is advisory).
    /// - Throws: ``BlockError`` `.closed` after ``close()``, `.readOnly`, or `.io`.
    public func discard(at offset: Int64, length: Int64) async throws {
        try await gate.run(filename, "discard") { try await discardAdmitted(at: offset, length: length) }
    }

    func discardAdmitted(at offset: Int64, length: Int64) async throws {
        try checkWritable("discard")
        guard length > 0, info.flags.contains(.sendTrim) else { return }
        let a = minBlock
        let start = (offset + a - 1) / a * a
        let end = min(offset + length, self.length) / a * a
        guard start < end else { return }
        try await serializer.withRange(start..<end, exclusive: false) {
            var pos = start
            while pos < end {
                let n = min(end - pos, maxNoPayload)
                try await perform(.trim, offset: pos, length: Int(n), operation: "discard")
                pos += n
            }
        }
    }
}
