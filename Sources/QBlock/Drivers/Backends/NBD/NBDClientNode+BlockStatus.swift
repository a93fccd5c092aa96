#if canImport(Glibc)
import Glibc
#endif
import Foundation
import QBlockCore
import QBlockGraph
import QBlockNBDWire

/// Block status from the `base:allocation` metadata context (or the `x-dirty-bitmap` one).
extension NBDClientNode {
    /// Block status from `base:allocation`: a hole is not data, a zero run reads as zeros;
    /// a run is allocated at this node when it is data or zeros (QEMU's block layer adds
    /// that to what its nbd driver reports). With an `x-dirty-bitmap` context
    /// (``NBDExportInfo/statusContext``) its flags stand in for `base:allocation`'s, an
    /// allocation depth above 2 counted as 2, as QEMU's client does.
    public func blockStatus(at offset: Int64, length: Int64) async throws -> BlockStatus {
        try await gate.run(filename, "block status") { try await blockStatusAdmitted(at: offset, length: length) }
    }

    func blockStatusAdmitted(at offset: Int64, length: Int64) async throws -> BlockStatus {
        let size = self.length
        if offset >= size {
            return BlockStatus(flags: [.zero, .allocated], length: max(1, length), hostOffset: offset)
        }
        let wanted = max(1, min(length, size - offset))
        guard let ctx = info.statusContextID else {
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
        var bits = ext.flags
        if info.statusContext == NBD.contextAllocationDepth && bits > 2 { bits = 2 }
        var flags: BlockStatus.Flags = []
        if bits & NBD.stateHole == 0 { flags.insert(.data) }
        if bits & NBD.stateZero != 0 { flags.insert(.zero) }
        if !flags.isEmpty { flags.insert(.allocated) }
        return BlockStatus(flags: flags, length: min(wanted, extEnd - offset), hostOffset: offset)
    }
}
