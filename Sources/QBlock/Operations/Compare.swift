#if canImport(Glibc)
import Glibc
#endif
import QBlockCore
import QBlockGraph

/// What `qemu-img compare` found.
public struct ImageComparison: Sendable, Equatable {
    /// The first difference, if any.
    public enum Difference: Sendable, Equatable {
        /// The guest content differs; the offset is that of the first differing 512-byte sector.
        case content(offset: Int64)
        /// Strict mode: the allocation status differs at this offset.
        case blockStatus(offset: Int64)
        /// Strict mode: the images have different sizes.
        case size
    }
    /// The sizes differ but the common part matched, so the tail of the longer image was
    /// checked too (qemu-img prints "Warning: Image size mismatch!" at that point).
    public var sizeMismatchWarning: Bool
    /// The first difference, or nil when the images are identical.
    public var difference: Difference?

    /// Whether the images compared equal (exit status 0 of `qemu-img compare`).
    public var identical: Bool { difference == nil }
}

/// `qemu-img compare`: compares the guest-visible content of two images (through their
/// backing chains), skipping runs that both report as zeros and reading the rest in
/// 2 MiB chunks, as qemu-img's `img_compare` does.
public enum ImageCompare {
    /// qemu-img's IO_BUF_SIZE.
    static let chunkSize: Int64 = 2 << 20
    private static let zeroSector = [UInt8](repeating: 0, count: 512)

    /// Compares `a` and `b`.
    /// - Parameters:
    ///   - strict: also require the same allocation status everywhere and the same size.
    ///   - progress: called with the percentage done (0...100).
    ///   - sizeMismatch: called when the common part matched and the tail of the longer
    ///     image is about to be checked (where qemu-img prints its size warning, before an
    ///     error in the tail ends the comparison).
    /// - Throws: ``BlockError`` when block status or a read fails; `operation` is
    ///   "block status" or "read" (qemu-img exits with 3 or 4 respectively).
    public static func compare(_ a: any BlockDriver, _ b: any BlockDriver, strict: Bool = false,
                               progress: ((Double) -> Void)? = nil,
                               sizeMismatch: (() -> Void)? = nil) async throws -> ImageComparison {
        let size1 = qemuLength(a), size2 = qemuLength(b)
        if strict && size1 != size2 {
            return ImageComparison(sizeMismatchWarning: false, difference: .size)
        }
        let common = min(size1, size2)
        let total = max(size1, size2)
        let buf1 = AlignedBuffer(count: Int(chunkSize))
        let buf2 = AlignedBuffer(count: Int(chunkSize))
        var offset: Int64 = 0
        func report() { if total > 0 { progress?(Double(offset) * 100 / Double(total)) } }
        progress?(0)
        while offset < common {
            let s1 = try await status(a, offset, size1)
            let s2 = try await status(b, offset, size2)
            var chunk = min(s1.length, s2.length, common - offset)
            if strict && s1.key(size1) != s2.key(size2) {
                return ImageComparison(sizeMismatchWarning: false, difference: .blockStatus(offset: offset))
            }
            if s1.zero && s2.zero {
                // Nothing to compare.
            } else if s1.present == s2.present {
                if s1.present {
                    chunk = min(chunk, chunkSize)
                    try await readPadded(a, offset, chunk, buf1)
                    try await readPadded(b, offset, chunk, buf2)
                    if let d = firstDifferentSector(buf1, buf2, Int(chunk)) {
                        return ImageComparison(sizeMismatchWarning: false, difference: .content(offset: offset + Int64(d)))
                    }
                }
            } else {
                chunk = min(chunk, chunkSize)
                let node = s1.present ? a : b
                try await readPadded(node, offset, chunk, buf1)
                if let d = firstNonZeroSector(buf1, Int(chunk)) {
                    return ImageComparison(sizeMismatchWarning: false, difference: .content(offset: offset + Int64(d)))
                }
            }
            offset += chunk
            report()
        }
        var result = ImageComparison(sizeMismatchWarning: size1 != size2, difference: nil)
        if size1 != size2 {
            sizeMismatch?()
            let (over, overSize) = size1 > size2 ? (a, size1) : (b, size2)
            while offset < overSize {
                let s = try await status(over, offset, overSize)
                var chunk = min(s.length, overSize - offset)
                if s.present && !s.zero {
                    chunk = min(chunk, chunkSize)
                    try await readPadded(over, offset, chunk, buf1)
                    if let d = firstNonZeroSector(buf1, Int(chunk)) {
                        result.difference = .content(offset: offset + Int64(d))
                        return result
                    }
                }
                offset += chunk
                report()
            }
        }
        return result
    }

    /// The status of the chain at `offset` as `bdrv_block_status_above(bs, NULL, ...)` gives it.
    private static func status(_ node: any BlockDriver, _ offset: Int64, _ size: Int64) async throws -> MapEntry {
        do {
            return try await BlockMap.status(of: node, at: offset, length: size - offset)
        } catch {
            let e = error.asBlockError
            throw BlockError(e.code, "Sector allocation test failed for \(node.filename)", errno: e.errno,
                             path: node.filename, offset: offset, operation: "block status", underlying: e)
        }
    }

    /// Reads `count` bytes at `offset`, zeros past the node's end (its last partial sector).
    private static func readPadded(_ node: any BlockDriver, _ offset: Int64, _ count: Int64, _ buf: AlignedBuffer) async throws {
        let avail = Int(max(0, min(count, node.length - offset)))
        do {
            try await buf.withUnsafeMutableBytes { b in
                if avail > 0 { try await node.read(at: offset, into: UnsafeMutableRawBufferPointer(rebasing: b[0..<avail])) }
                if avail < Int(count) { memset(b.baseAddress! + avail, 0, Int(count) - avail) }
            }
        } catch {
            let e = error.asBlockError
            throw BlockError(e.code, "Error while reading offset \(offset) of \(node.filename): \(e.message)", errno: e.errno,
                             path: node.filename, offset: offset, operation: "read", underlying: e)
        }
    }

    /// qemu-img's `compare_buffers` with `min_pnum` 0: the start of the first 512-byte
    /// sector that differs, or nil.
    static func firstDifferentSector(_ x: AlignedBuffer, _ y: AlignedBuffer, _ count: Int) -> Int? {
        x.withUnsafeBytes { p in
            y.withUnsafeBytes { q in
                var i = 0
                while i < count {
                    let n = min(512, count - i)
                    if memcmp(p.baseAddress! + i, q.baseAddress! + i, n) != 0 { return i }
                    i += n
                }
                return nil
            }
        }
    }

    /// qemu-img's `find_nonzero`: the start of the first 512-byte sector holding a non-zero byte.
    static func firstNonZeroSector(_ x: AlignedBuffer, _ count: Int) -> Int? {
        x.withUnsafeBytes { p in
            zeroSector.withUnsafeBytes { z in
                var i = 0
                while i < count {
                    let n = min(512, count - i)
                    if memcmp(p.baseAddress! + i, z.baseAddress!, n) != 0 { return i }
                    i += n
                }
                return nil
            }
        }
    }
}

extension MapEntry {
    /// The fields of a chain status that strict compare requires to be equal (QEMU compares
    /// the whole status word: data, zero, allocated, offset valid, end of file).
    fileprivate func key(_ size: Int64) -> [Bool] {
        [data, zero, present, offset != nil, start + length == size]
    }
}
