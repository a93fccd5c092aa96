#if canImport(Glibc)
import Glibc
#endif
import QBlockBitmaps
import QBlockCore
import QBlockGraph

/// Finishing, offline, a mirror whose process died (`img mirror-finish`): the mirror's
/// persistent dirty bitmap (a ``BitmapSideFile``, the `x-bitmap-file` of `drive-mirror`)
/// names every cluster the target may lack; those are copied from the source, and nothing
/// else. An all-clear bitmap means the target already was a complete, current copy.
///
/// Why this is enough: the mirror makes new 1 bits durable before any flush of the source
/// completes, and writes 0 bits only after the target holding the copied data was flushed,
/// so after a crash every cluster written by a flushed write and not yet durably on the
/// target is dirty in the file. The source is authoritative.
public enum MirrorFinish {
    /// What a finish did.
    public struct Result: Sendable, Equatable {
        /// Bytes the bitmap marked dirty when the finish started.
        public var dirtyBytes: Int64
        /// Bytes copied (the dirty clusters, clipped to the disk).
        public var copiedBytes: Int64
        /// Disk size.
        public var size: Int64
    }

    /// Reads the disk size and granularity a side file was made for.
    /// - Throws: ``BlockError`` `.corrupt` for a file that is not a side file.
    public static func sideFileGeometry(_ path: String) throws -> (size: Int64, granularity: Int64) {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else {
            throw BlockError(.notFound, "Could not open '\(path)': \(BlockError.strerror(errno))", errno: errno, path: path, operation: "open")
        }
        defer { close(fd) }
        var head = [UInt8](repeating: 0, count: 32)
        let n = head.withUnsafeMutableBytes { pread(fd, $0.baseAddress, 32, 0) }
        guard n == 32, Array(head[0..<8]) == Array("QBDIRTY1".utf8) else {
            throw BlockError(.corrupt, "'\(path)' is not a bitmap side file", path: path, operation: "open")
        }
        func le64(_ at: Int) -> Int64 { (0..<8).reduce(Int64(0)) { $0 | Int64(head[at + $1]) << (8 * $1) } }
        return (le64(16), le64(24))
    }

    /// Copies the clusters the side file marks dirty from `source` to `target`, then
    /// flushes the target and clears the file.
    /// - Parameters:
    ///   - source: the mirror's source, open (read-only is enough).
    ///   - target: the mirror's target, open read-write.
    ///   - bitmapFile: the side file.
    /// - Throws: ``BlockError`` when the geometry does not match the disks, or on I/O errors
    ///   (the file then still marks what was not copied).
    public static func finish(source: any BlockDriver, target: any BlockDriver, bitmapFile: String,
                              progress: ((Double) -> Void)? = nil) async throws -> Result {
        let (size, granularity) = try sideFileGeometry(bitmapFile)
        guard size == source.length, size == target.length else {
            throw BlockError(.invalidArgument, "Bitmap side file '\(bitmapFile)' is for a disk of \(size) bytes; source has \(source.length), target \(target.length)",
                             path: bitmapFile, operation: "mirror-finish")
        }
        let bitmap = try DirtyBitmap(name: "", size: size, granularity: granularity)
        let side = try await BitmapSideFile.open(path: bitmapFile, bitmap: bitmap)
        let dirty = bitmap.dirtyBytes
        var copied: Int64 = 0
        let chunk = max(granularity, Int64(1 << 20) / granularity * granularity)
        let buf = AlignedBuffer(count: Int(chunk))
        do {
            var offset: Int64 = 0
            while let area = bitmap.nextDirtyArea(from: offset) {
                let n = min(area.length, chunk)
                try await buf.withUnsafeMutableBytes { b in
                    let part = UnsafeMutableRawBufferPointer(rebasing: b[0..<Int(n)])
                    try await source.read(at: area.offset, into: part)
                    try await target.write(at: area.offset, from: UnsafeRawBufferPointer(part), flags: [])
                }
                bitmap.reset(offset: area.offset, length: n)
                copied += n
                offset = area.offset + n
                if dirty > 0 { progress?(Double(copied) * 100 / Double(dirty)) }
            }
            try await target.flush()
            _ = try await side.writeBackClean()
        } catch {
            try? await side.close()
            throw error
        }
        try await side.close()
        return Result(dirtyBytes: dirty, copiedBytes: copied, size: size)
    }
}
