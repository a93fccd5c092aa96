#if canImport(Glibc)
import Glibc
#endif
import Foundation
import QBlockCore
import QBlockGraph
import QBlockNBDWire

/// Block status from the `base:allocation` metadata context.
extension NBDClientNode {
    /// Block status from `base:allocation`: a hole is not data, a zero run reads as zeros;
    /// every run is allocated at this node, as QEMU's nbd driver reports it.
    public func blockStatus(at offset: Int64, length: Int64) async throws -> BlockStatus {
        try await gate.run(filename, "block status") { try await blockStatusAdmitted(at: offset, length: length) }
    }

    func blockStatusAdmitted(at offset: Int64, length: Int64) async throws -> BlockStatus {
        let size = self.length
        if offset >= size {
            return BlockStatus(flags: [.zero, .allocated], length: max(1, length), hostOffset: offset)
        }
        let wanted = max(1, min(length, size - offset))
        guard let ctx = info.baseAllocationID else {
            return BlockStatus(flags: [.data, .allocated], length: wanted, hostOffset: offset)
        }
        let a = minBlock
        let start = offset / a * a
        let end = min((offset + wanted + a - 1) / a * a, size, start + maxNoPayload)
        let req = try await perform(.blockStatus, flags: [.reqOne], offset: start, length: Int(end - start),
                                    operation: "block status")
        guard let ext = req.extents[ctx] else {
            throw BlockError(.io, "NBD server did not reply with any status extents", errno: EIO, path: filename,
                             offset: offset, operation: "block status")
        }
        let extEnd = start + Int64(ext.length)
        // An extent shorter than the alignment slack: report one aligned block as data.
        guard extEnd > offset else {
            return BlockStatus(flags: [.data, .allocated], length: min(wanted, end - offset), hostOffset: offset)
        }
        var flags: BlockStatus.Flags = [.allocated]
        if ext.flags & NBD.stateHole == 0 { flags.insert(.data) }
        if ext.flags & NBD.stateZero != 0 { flags.insert(.zero) }
        return BlockStatus(flags: flags, length: min(wanted, extEnd - offset), hostOffset: offset)
    }
}
