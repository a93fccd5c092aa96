#if canImport(Glibc)
import Glibc
#endif
import QBlockBitmaps
import QBlockCore
import QBlockGraph
import QBlockNBDWire
import QBlockOperations

/// Running validated transmission commands against an export's node, and replying.
extension NBDConnection {
    func execute(_ command: NBDTransmission.Command, cookie: UInt64, buffer: NBDBuffer?, tx: NBDTransmission,
                 export: NBDExport) async {
        do {
            switch command {
            case .read(let offset, let length, let df):
                try await read(offset: offset, length: length, dontFragment: df, cookie: cookie, buffer: buffer, tx: tx,
                               export: export)
                return
            case .write(let offset, let length, let fua):
                guard let buffer else { throw BlockError(.internalError, "write without a buffer") }
                try await export.write(at: Int64(offset), from: UnsafeRawBufferPointer(buffer.bytes(Int(length))), fua: fua)
            case .flush:
                try await export.node.flush()
            case .trim(let offset, let length, let fua):
                try await export.trim(at: Int64(offset), length: Int64(length), fua: fua)
            case .cache(let offset, let length):
                try await export.prefetch(at: Int64(offset), length: Int64(length), pool: buffers)
            case .writeZeroes(let offset, let length, let fua, let noHole, let fastZero):
                try await export.writeZeroes(at: Int64(offset), length: Int64(length), fua: fua, mayUnmap: !noHole,
                                             fast: fastZero)
            case .blockStatus(let offset, let length, let reqOne):
                try await blockStatus(offset: offset, length: length, reqOne: reqOne, cookie: cookie, tx: tx, export: export)
                return
            }
            await reply([.bytes(tx.successReply(cookie: cookie))])
        } catch {
            let e = error.asBlockError
            await reply([.bytes(tx.errorReply(cookie: cookie, error: NBD.WireError(errno: e.errnoValue), message: e.message))])
        }
    }

    private func read(offset: UInt64, length: UInt32, dontFragment: Bool, cookie: UInt64, buffer: NBDBuffer?,
                      tx: NBDTransmission, export: NBDExport) async throws {
        guard length > 0 else {
            await reply([.bytes(tx.successReply(cookie: cookie))])
            return
        }
        guard let buffer else { throw BlockError(.internalError, "read without a buffer") }
        let node = export.node
        if tx.structuredReplies && !dontFragment {
            // Sparse read: runs that read as zeros go out as holes, without data.
            var runs: [(length: Int64, zero: Bool)] = []
            var pos = Int64(offset)
            let end = Int64(offset) + Int64(length)
            while pos < end {
                let s = try await BlockMap.status(of: node, at: pos, length: end - pos)
                let n = max(1, min(s.length, end - pos))
                runs.append((n, s.zero))
                pos += n
            }
            let pieces = NBDTransmission.readPieces(offset: offset, length: length, runs: runs)
            var parts: [NBDReplyPart] = []
            parts.reserveCapacity(pieces.count * 2)
            for (i, piece) in pieces.enumerated() {
                let done = i == pieces.count - 1
                switch piece {
                case .data(let o, let l):
                    let slice = UnsafeMutableRawBufferPointer(start: buffer.base + Int(o - offset), count: Int(l))
                    try await node.read(at: Int64(o), into: slice)
                    parts.append(.bytes(NBDTransmission.dataChunkHeader(cookie: cookie, offset: o, length: l, done: done)))
                    parts.append(.memory(UnsafeRawBufferPointer(slice)))
                case .hole(let o, let l):
                    parts.append(.bytes(NBDEncode.holeChunk(cookie: cookie, offset: o, length: l, done: done)))
                }
            }
            await reply(parts)
            return
        }
        let data = buffer.bytes(Int(length))
        try await node.read(at: Int64(offset), into: data)
        if tx.structuredReplies {
            await reply([.bytes(NBDTransmission.dataChunkHeader(cookie: cookie, offset: offset, length: length, done: true)),
                         .memory(UnsafeRawBufferPointer(data))])
        } else {
            await reply([.bytes(NBDEncode.simpleReplyHeader(error: .ok, cookie: cookie)), .memory(UnsafeRawBufferPointer(data))])
        }
    }

    private func blockStatus(offset: UInt64, length: UInt32, reqOne: Bool, cookie: UInt64, tx: NBDTransmission,
                             export: NBDExport) async throws {
        let limit = reqOne ? 1 : NBDTransmission.maxExtents
        var chunks: [[UInt8]] = []
        for (i, context) in tx.contexts.enumerated() {
            var extents: [(UInt32, UInt32)] = []
            if case .dirtyBitmap(let index) = context, index < export.options.bitmaps.count {
                Self.bitmapExtents(export.options.bitmaps[index], offset: Int64(offset), length: Int64(length),
                                   limit: limit, into: &extents)
                chunks.append(NBDEncode.blockStatusChunk(cookie: cookie, contextID: context.rawValue, extents: extents,
                                                         done: i == tx.contexts.count - 1))
                continue
            }
            var pos = Int64(offset)
            let end = Int64(offset) + Int64(length)
            while pos < end {
                let s = try await BlockMap.status(of: export.node, at: pos, length: end - pos)
                let n = max(1, min(s.length, end - pos))
                let flags: UInt32
                switch context {
                case .baseAllocation: flags = NBDTransmission.allocationFlags(data: s.data, zero: s.zero)
                case .allocationDepth: flags = s.present ? UInt32(s.depth + 1) : 0
                case .dirtyBitmap: flags = 0
                }
                guard NBDTransmission.addExtent(&extents, length: UInt32(n), flags: flags, limit: limit) else { break }
                pos += n
            }
            chunks.append(NBDEncode.blockStatusChunk(cookie: cookie, contextID: context.rawValue, extents: extents,
                                                     done: i == tx.contexts.count - 1))
        }
        await reply(chunks.map { .bytes($0) })
    }
}

extension NBDConnection {
    /// `qemu:dirty-bitmap:` extents of `[offset, offset+length)` as qemu-nbd's
    /// `bitmap_to_extents`: alternating clean (0) and dirty (NBD_STATE_DIRTY) runs, merged,
    /// at most `limit` of them.
    static func bitmapExtents(_ b: DirtyBitmap, offset: Int64, length: Int64, limit: Int, into extents: inout [(UInt32, UInt32)]) {
        let end = offset + length
        var start = offset
        while start < end, let (o, l) = b.nextDirtyArea(from: start, maxLength: end - start) {
            if o > start {
                guard NBDTransmission.addExtent(&extents, length: UInt32(o - start), flags: 0, limit: limit) else { return }
            }
            guard NBDTransmission.addExtent(&extents, length: UInt32(l), flags: NBD.stateDirty, limit: limit) else { return }
            start = o + l
        }
        if end > start { _ = NBDTransmission.addExtent(&extents, length: UInt32(end - start), flags: 0, limit: limit) }
    }
}

/// The data operations of an export, with qemu-nbd's option semantics applied.
extension NBDExport {
    func write(at offset: Int64, from data: UnsafeRawBufferPointer, fua: Bool) async throws {
        let fua = fua || options.writethrough
        let policy = writePolicy.current
        if policy.detectZeroes != .off && Self.isZero(data) {
            var flags: WriteFlags = fua ? [.fua] : []
            if policy.detectZeroes == .unmap && policy.discard == .unmap { flags.insert(.mayUnmap) }
            try await node.writeZeroes(at: offset, length: Int64(data.count), flags: flags)
            return
        }
        try await node.write(at: offset, from: data, flags: fua ? [.fua] : [])
    }

    func writeZeroes(at offset: Int64, length: Int64, fua: Bool, mayUnmap: Bool, fast: Bool) async throws {
        var flags: WriteFlags = []
        if fua || options.writethrough { flags.insert(.fua) }
        // Without discard=unmap the node never deallocates (qemu strips BDRV_REQ_MAY_UNMAP).
        if mayUnmap && writePolicy.discard == .unmap { flags.insert(.mayUnmap) }
        if fast { flags.insert(.noFallback) }
        try await node.writeZeroes(at: offset, length: length, flags: flags)
    }

    func trim(at offset: Int64, length: Int64, fua: Bool) async throws {
        if writePolicy.discard == .unmap {
            try await node.discard(at: offset, length: length)
        }
        if fua || options.writethrough { try await node.flush() }
    }

    /// NBD_CMD_CACHE: reads the range (warming the page cache and the format's metadata
    /// caches) and drops the data.
    func prefetch(at offset: Int64, length: Int64, pool: NBDBufferPool) async throws {
        guard length > 0 else { return }
        let b = pool.take(Int(min(length, 1 << 20)))
        defer { pool.put(b) }
        var pos = offset
        while pos < offset + length {
            let n = min(Int64(b.count), offset + length - pos)
            try await node.read(at: pos, into: b.bytes(Int(n)))
            pos += n
        }
    }

    static func isZero(_ data: UnsafeRawBufferPointer) -> Bool {
        guard let base = data.baseAddress, data.count > 0 else { return true }
        return QBlockCore.isZero(base, data.count)
    }
}
