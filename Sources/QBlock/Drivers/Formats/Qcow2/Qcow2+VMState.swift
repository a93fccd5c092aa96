#if canImport(Glibc)
import Glibc
#endif
import QBlockCore
import QBlockGraph

/// The VM state area (QEMU's `qcow2_save_vmstate` and `qcow2_load_vmstate`): guest clusters
/// from ``DriverInfo/vmStateOffset`` on, past the virtual size, mapped by L1 entries beyond
/// the ones the disk needs. The L1 table grows as VM state is written; internal snapshots
/// keep those entries with the rest of the table. Dirty bitmaps do not track the area.
extension Qcow2Node: VMStateStoring {
    /// Writes VM state at `position` of the area, through the normal allocating write path.
    /// - Throws: ``BlockError`` `.closed`, `.readOnly`, `.invalidArgument` (EFBIG) when the
    ///   L1 table would pass QEMU's limit, I/O errors.
    public func writeVMState(at position: Int64, from buffer: UnsafeRawBufferPointer) async throws {
        try gate.enter(filename, "save vmstate")
        defer { gate.leave() }
        try checkWritable("save vmstate")
        let offset = try vmStateRange(position, Int64(buffer.count), "save vmstate")
        guard buffer.count > 0 else { return }
        let coverage = Int64(clusterSize) * Int64(l2Entries)
        let needed = (offset + Int64(buffer.count) + coverage - 1) / coverage
        if needed > l1Table.count {
            // As QEMU's qcow2_grow_l1_table when a write needs more entries: by half again
            // until it is enough, up to QCOW_MAX_L1_SIZE (32 MiB of entries).
            var entries = Int64(max(l1Table.count, 1))
            while entries < needed && entries <= (32 << 20) / 8 { entries = (entries * 3 + 1) / 2 }
            if entries > (32 << 20) / 8 {
                throw BlockError(.invalidArgument, BlockError.strerror(EFBIG), errno: EFBIG, path: filename,
                                 offset: position, operation: "save vmstate")
            }
            await metaLock.lock()
            do {
                if needed > l1Table.count { try await growL1(to: Int(entries)) }
            } catch {
                metaLock.unlock()
                throw error
            }
            metaLock.unlock()
        }
        var done = 0
        while done < buffer.count {
            done += try await writeRun(at: offset + Int64(done),
                                       from: UnsafeRawBufferPointer(rebasing: buffer[done...]), flags: [], placed: nil)
        }
    }

    /// Reads VM state at `position` of the area; clusters never written read as zeros.
    /// - Throws: ``BlockError`` `.closed`, `.invalidArgument` for a negative position, I/O errors.
    public func readVMState(at position: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws {
        try gate.enter(filename, "load vmstate")
        defer { gate.leave() }
        let offset = try vmStateRange(position, Int64(buffer.count), "load vmstate")
        try await readRuns(at: offset, into: buffer)
    }

    /// The guest offset of VM state `position`, after checking the request.
    private func vmStateRange(_ position: Int64, _ length: Int64, _ op: String) throws -> Int64 {
        let base = driverInfo.vmStateOffset
        if position < 0 || length < 0 || position > Int64.max / 2 - base - length {
            throw BlockError(.invalidArgument, BlockError.strerror(EINVAL), errno: EINVAL, path: filename,
                             offset: position, operation: op)
        }
        return base + position
    }
}
