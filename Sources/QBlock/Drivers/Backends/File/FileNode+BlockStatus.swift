#if canImport(Glibc)
import Glibc
#endif
import CSupport
import QBlockCore
import QBlockGraph

/// Block status from `SEEK_DATA`/`SEEK_HOLE`.
extension FileNode {
    // MARK: Block status

    /// Whether the run at `offset` (up to `length` bytes) is data or a hole, from
    /// `SEEK_DATA`/`SEEK_HOLE` (QEMU's `raw_co_block_status`); holes read as zeroes, and
    /// everything is allocated at this layer.
    /// - Throws: ``BlockError`` `.closed` after ``close()``, or an I/O error.
    public func blockStatus(at offset: Int64, length: Int64) async throws -> BlockStatus {
        try await gate.run(filename, "block status") { try await blockStatusAdmitted(at: offset, length: length) }
    }

    func blockStatusAdmitted(at offset: Int64, length: Int64) async throws -> BlockStatus {
        let fileLength = self.length
        if isBlockDevice || offset >= fileLength {
            // Beyond end of file reads as zeros; a block device is all data.
            let flags: BlockStatus.Flags = isBlockDevice ? [.data, .allocated] : [.zero, .allocated]
            return BlockStatus(flags: flags, length: length, hostOffset: offset)
        }
        let fd = self.fd
        let maxLen = min(length, fileLength - offset)
        let r: (Int64, Bool)? = await pool.run {
            switch Syscalls.lseek(fd, offset, qb_seek_data()) {
            case .failure(let e):
                if e.rawValue == ENXIO { return (maxLen, false) } // hole to end of file
                return nil
            case .success(let data):
                if data > offset { return (min(data - offset, maxLen), false) }
                switch Syscalls.lseek(fd, offset, qb_seek_hole()) {
                case .success(let hole): return (min(max(hole - offset, 1), maxLen), true)
                case .failure: return nil
                }
            }
        }
        guard let (found, isData) = r else {
            return BlockStatus(flags: [.data, .allocated], length: maxLen, hostOffset: offset)
        }
        var n = found
        // Under O_DIRECT a data run ending in a partial block at the end of the file covers
        // that whole block (QEMU's raw_co_block_status returns no partial blocks).
        let a = Int64(directAlignment)
        if isData, cacheMode.direct, a > 1, offset + n == fileLength, fileLength % a != 0 {
            n = min((fileLength + a - 1) / a * a - offset, length)
        }
        return BlockStatus(flags: isData ? [.data, .allocated] : [.zero, .allocated], length: n, hostOffset: offset)
    }
}
