#if canImport(Glibc)
import Glibc
#endif
import QBlockCore
import QBlockGraph

/// Request checks that QEMU's block backend makes before a request reaches a driver
/// (`blk_check_byte_request`), and allocation queries as `bdrv_is_allocated` answers them.
/// Drivers assume in-range requests; front ends (tools, servers) go through these.
public enum BlockRequestLimits {
    /// The largest single request QEMU accepts: `BDRV_REQUEST_MAX_BYTES` (INT_MAX rounded down to 512).
    public static let maxBytes: Int64 = 2_147_483_136
}

extension BlockDriver {
    /// Throws EIO ("Input/output error", as QEMU) unless `[offset, offset+length)` lies within the node.
    public func checkRequest(offset: Int64, length: Int64, operation: String) throws {
        let size = self.length
        if offset < 0 || length < 0 || offset > size || size - offset < length {
            throw BlockError(.outOfRange, BlockError.strerror(EIO), errno: EIO, path: filename,
                             offset: offset, operation: operation)
        }
    }

    /// Reads after checking the range.
    public func checkedRead(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws {
        try checkRequest(offset: offset, length: Int64(buffer.count), operation: "read")
        try await read(at: offset, into: buffer)
    }

    /// Writes after checking the range.
    public func checkedWrite(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags) async throws {
        try checkRequest(offset: offset, length: Int64(buffer.count), operation: "write")
        try await write(at: offset, from: buffer, flags: flags)
    }

    /// Writes zeroes after checking the range.
    public func checkedWriteZeroes(at offset: Int64, length: Int64, flags: WriteFlags) async throws {
        try checkRequest(offset: offset, length: length, operation: "write zeroes")
        try await writeZeroes(at: offset, length: length, flags: flags)
    }

    /// Discards after checking the range.
    public func checkedDiscard(at offset: Int64, length: Int64) async throws {
        try checkRequest(offset: offset, length: length, operation: "discard")
        try await discard(at: offset, length: length)
    }

    /// A compressed write after checking the range, as QEMU's `blk_pwrite_compressed`: the
    /// request goes to the first node under any filters that can store compressed clusters,
    /// and must start on a cluster boundary and cover whole clusters (the last may end at the
    /// end of the image).
    /// - Throws: ``BlockError`` EIO for a range past the end, `.unsupported` (ENOTSUP) when no
    ///   node stores compressed clusters, `.invalidArgument` (EINVAL) for a misaligned
    ///   request, EIO when a cluster is already allocated, I/O errors.
    public func checkedWriteCompressed(at offset: Int64, from buffer: UnsafeRawBufferPointer) async throws {
        try checkRequest(offset: offset, length: Int64(buffer.count), operation: "write compressed")
        var node: any BlockDriver = self
        while !(node is any CompressedWriting), let f = node as? any BlockFilter { node = f.filteredChild }
        guard let target = node as? any CompressedWriting else {
            throw BlockError(.unsupported, BlockError.strerror(ENOTSUP), errno: ENOTSUP, path: filename,
                             offset: offset, operation: "write compressed")
        }
        let cs = Int64(target.clusterSize)
        let count = Int64(buffer.count)
        if offset % cs != 0 || (count % cs != 0 && offset + count != target.length) {
            throw BlockError(.invalidArgument, BlockError.strerror(EINVAL), errno: EINVAL, path: filename,
                             offset: offset, operation: "write compressed")
        }
        var done: Int64 = 0
        while done < count {
            let n = Int(min(cs, count - done))
            try await target.writeCompressedCluster(at: offset + done,
                                                    data: UnsafeRawBufferPointer(rebasing: buffer[Int(done)..<Int(done) + n]))
            done += Int64(n)
        }
    }

    /// Writes VM state at `position` (QEMU's `bdrv_save_vmstate`): in the first node under
    /// any filters that stores VM state.
    /// - Throws: ``BlockError`` `.unsupported` (ENOTSUP) when no node stores VM state, or
    ///   what ``VMStateStoring/writeVMState(at:from:)`` throws.
    public func saveVMState(at position: Int64, from buffer: UnsafeRawBufferPointer) async throws {
        try await vmStateNode(position, Int64(buffer.count), "save vmstate").writeVMState(at: position, from: buffer)
    }

    /// Reads VM state at `position` (QEMU's `bdrv_load_vmstate`): from the first node under
    /// any filters that stores VM state.
    /// - Throws: ``BlockError`` `.unsupported` (ENOTSUP) when no node stores VM state, or
    ///   what ``VMStateStoring/readVMState(at:into:)`` throws.
    public func loadVMState(at position: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws {
        try await vmStateNode(position, Int64(buffer.count), "load vmstate").readVMState(at: position, into: buffer)
    }

    /// The node that serves VM state requests for this one, after QEMU's request checks.
    private func vmStateNode(_ position: Int64, _ length: Int64, _ operation: String) throws -> any VMStateStoring {
        if position < 0 || length < 0 || position > Int64.max / 2 - length {
            throw BlockError(.invalidArgument, BlockError.strerror(EINVAL), errno: EINVAL, path: filename,
                             offset: position, operation: operation)
        }
        var node: any BlockDriver = self
        while !(node is any VMStateStoring), let f = node as? any BlockFilter { node = f.filteredChild }
        guard let target = node as? any VMStateStoring else {
            throw BlockError(.unsupported, BlockError.strerror(ENOTSUP), errno: ENOTSUP, path: filename,
                             offset: position, operation: operation)
        }
        return target
    }

    /// Whether the run starting at `offset` is allocated in this node (not in its backing
    /// chain) and how long that run is, at most `length`; `(false, 0)` at or past the end,
    /// like `bdrv_is_allocated`.
    public func allocation(at offset: Int64, length: Int64) async throws -> (allocated: Bool, length: Int64) {
        let size = self.length
        guard offset >= 0, offset < size, length > 0 else { return (false, 0) }
        let want = min(length, size - offset)
        let status = try await blockStatus(at: offset, length: want)
        return (status.flags.contains(.allocated), max(0, min(status.length, want)))
    }

    /// Like ``allocation(at:length:)`` but merges following runs of the same state
    /// (qemu-io's `map_is_allocated`).
    public func allocationRun(at offset: Int64, length: Int64) async throws -> (allocated: Bool, length: Int64) {
        let first = try await allocation(at: offset, length: length)
        var total = first.length
        var pos = offset + first.length
        var remaining = length - first.length
        while remaining > 0 && first.length > 0 {
            let next = try await allocation(at: pos, length: remaining)
            guard next.allocated == first.allocated, next.length > 0 else { break }
            total += next.length
            pos += next.length
            remaining -= next.length
        }
        return (first.allocated, total)
    }
}
