#if canImport(Glibc)
import Glibc
#endif
import QBlockCore
import QBlockDrivers
import QBlockGraph

/// `qemu-img rebase`: changes the backing file of an image.
///
/// In safe mode the image's visible content does not change: every region the image does
/// not allocate itself and that reads differently through the old backing chain than
/// through the new backing file is first copied into the image (from the old chain), then
/// the header is switched. Unsafe mode only rewrites the header.
public enum ImageRebase {
    static let chunkSize: Int64 = 2 << 20

    /// Copies into `image` what it needs to keep its content once `newBacking` (nil: none)
    /// replaces its current backing chain, then names `backingName` (nil or empty: none)
    /// with `backingFormat` in its header.
    /// - Parameters:
    ///   - image: the image, open read-write with its current backing chain.
    ///   - progress: called with the percentage done.
    /// - Throws: ``BlockError`` (reads, writes, or a header change that fails).
    public static func rebase(_ image: any BlockDriver, onto newBacking: (any BlockDriver)?,
                              backingName: String?, backingFormat: String?,
                              progress: ((Double) -> Void)? = nil) async throws {
        guard let q = image as? any BackingLinked else {
            throw BlockError(.unsupported, "Operation not supported", errno: ENOTSUP, path: image.filename, operation: "rebase")
        }
        let size = image.length
        let oldBacking = image.backing
        let oldSize = oldBacking.map { $0.length } ?? 0
        let bufOld = AlignedBuffer(count: Int(chunkSize))
        let bufNew = AlignedBuffer(count: Int(chunkSize))
        var offset: Int64 = 0
        progress?(0)
        while offset < size {
            let want = min(chunkSize, size - offset)
            let st = try await image.blockStatus(at: offset, length: want)
            let n = min(st.length, want)
            defer { offset += n }
            if st.flags.contains(.allocated) { continue }
            let oldIsZero = offset >= oldSize
            try await readPadded(oldBacking, offset, n, bufOld, "old backing file")
            try await readPadded(newBacking, offset, n, bufNew, "new backing file")
            // Write every run of differing 512-byte sectors.
            var pos = 0
            let count = Int(n)
            while pos < count {
                let differs = sectorDiffers(bufOld, bufNew, pos, min(512, count - pos))
                var end = pos + min(512, count - pos)
                while end < count && sectorDiffers(bufOld, bufNew, end, min(512, count - end)) == differs {
                    end += min(512, count - end)
                }
                if differs {
                    let at = offset + Int64(pos)
                    if oldIsZero {
                        try await q.writeZeroes(at: at, length: Int64(end - pos), flags: [])
                    } else {
                        try await bufOld.withUnsafeBytes { b in
                            try await q.write(at: at, from: UnsafeRawBufferPointer(rebasing: b[pos..<end]), flags: [])
                        }
                    }
                }
                pos = end
            }
            if size > 0 { progress?(Double(offset + n) * 100 / Double(size)) }
        }
        try await q.flush()
        try await changeBackingFile(of: q, to: backingName, format: backingFormat)
    }

    /// Rewrites the backing file name and format in the header (unsafe mode).
    /// - Throws: ``BlockError`` with qemu-img's "Could not change the backing file to ..." message.
    public static func changeBackingFile(of image: any BlockDriver, to name: String?, format: String?) async throws {
        let target = name ?? ""
        guard let q = image as? any BackingLinked else {
            throw BlockError(.unsupported, "Could not change the backing file to '\(target)': Operation not supported",
                             errno: ENOTSUP, path: image.filename, operation: "rebase")
        }
        do {
            try await q.setBackingFile(name, format: format)
        } catch let e as BlockError {
            throw BlockError(e.code, "Could not change the backing file to '\(target)': \(e.message)", errno: e.errno,
                             path: image.filename, operation: "rebase", underlying: e)
        }
    }

    private static func sectorDiffers(_ a: AlignedBuffer, _ b: AlignedBuffer, _ at: Int, _ n: Int) -> Bool {
        a.withUnsafeBytes { p in b.withUnsafeBytes { q in memcmp(p.baseAddress! + at, q.baseAddress! + at, n) != 0 } }
    }

    /// Reads `count` bytes of `node` at `offset`; zeros where there is no node or past its end.
    private static func readPadded(_ node: (any BlockDriver)?, _ offset: Int64, _ count: Int64, _ buf: AlignedBuffer,
                                   _ what: String) async throws {
        let avail = Int(max(0, min(count, (node?.length ?? 0) - offset)))
        do {
            try await buf.withUnsafeMutableBytes { b in
                if let node, avail > 0 {
                    try await node.read(at: offset, into: UnsafeMutableRawBufferPointer(rebasing: b[0..<avail]))
                }
                if avail < Int(count) { memset(b.baseAddress! + avail, 0, Int(count) - avail) }
            }
        } catch {
            let e = error.asBlockError
            throw BlockError(e.code, "error while reading from \(what): \(e.message)", errno: e.errno,
                             path: node?.filename, offset: offset, operation: "read", underlying: e)
        }
    }
}
