#if canImport(Glibc)
import Glibc
#endif
import CZlib
import CZstd
import QBlockCore

/// Compressed clusters: raw deflate with a 4 KiB window (zlib, `windowBits = -12`) or a
/// zstd frame, as QEMU writes them. The compressed bytes occupy whole 512-byte sectors,
/// so decompression stops once the cluster is full and ignores what follows.
enum Qcow2Compression {
    /// Decompresses `input` into exactly `output.count` bytes.
    /// - Throws: `.corrupt` if the data is not a valid stream or is too short.
    static func decompress(_ type: Qcow2CompressionType, _ input: UnsafeRawBufferPointer,
                           into output: UnsafeMutableRawBufferPointer) throws {
        switch type {
        case .zlib: try inflateRaw(input, output)
        case .zstd: try zstdDecompress(input, output)
        }
    }

    private static func inflateRaw(_ input: UnsafeRawBufferPointer, _ output: UnsafeMutableRawBufferPointer) throws {
        var strm = z_stream()
        guard inflateInit2_(&strm, -12, ZLIB_VERSION, Int32(MemoryLayout<z_stream>.size)) == Z_OK else {
            throw BlockError(.internalError, "zlib: inflateInit2 failed")
        }
        defer { inflateEnd(&strm) }
        // SAFETY: zlib reads `avail_in` bytes from `next_in` and writes at most `avail_out`
        // bytes to `next_out`; both buffers outlive this call.
        strm.next_in = UnsafeMutablePointer(mutating: input.baseAddress?.assumingMemoryBound(to: Bytef.self))
        strm.avail_in = uInt(input.count)
        strm.next_out = output.baseAddress?.assumingMemoryBound(to: Bytef.self)
        strm.avail_out = uInt(output.count)
        let r = inflate(&strm, Z_FINISH)
        let ok = r == Z_STREAM_END || (r == Z_BUF_ERROR && strm.avail_out == 0)
        guard ok && strm.avail_out == 0 else {
            throw BlockError(.corrupt, "Could not decompress cluster (zlib error \(r))")
        }
    }

    private static func zstdDecompress(_ input: UnsafeRawBufferPointer, _ output: UnsafeMutableRawBufferPointer) throws {
        guard let dctx = ZSTD_createDCtx() else { throw BlockError(.internalError, "zstd: cannot create context") }
        defer { ZSTD_freeDCtx(dctx) }
        var inBuf = ZSTD_inBuffer(src: input.baseAddress, size: input.count, pos: 0)
        var outBuf = ZSTD_outBuffer(dst: output.baseAddress, size: output.count, pos: 0)
        // The compressed data is a single frame followed by padding; stop when the cluster is full.
        while outBuf.pos < outBuf.size {
            let before = (inBuf.pos, outBuf.pos)
            let r = ZSTD_decompressStream(dctx, &outBuf, &inBuf)
            if ZSTD_isError(r) != 0 {
                throw BlockError(.corrupt, "Could not decompress cluster (zstd: \(String(cString: ZSTD_getErrorName(r))))")
            }
            if r == 0 && outBuf.pos < outBuf.size { break }
            if before == (inBuf.pos, outBuf.pos) { break }
        }
        guard outBuf.pos == outBuf.size else {
            throw BlockError(.corrupt, "Could not decompress cluster (zstd: data too short)")
        }
    }

    /// Compresses one cluster. Returns nil if the result would not be smaller than
    /// `maxSize` (the caller then writes the cluster uncompressed, as QEMU does).
    static func compress(_ type: Qcow2CompressionType, _ input: UnsafeRawBufferPointer, maxSize: Int) -> [UInt8]? {
        switch type {
        case .zlib:
            var strm = z_stream()
            guard deflateInit2_(&strm, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9, Z_DEFAULT_STRATEGY,
                                ZLIB_VERSION, Int32(MemoryLayout<z_stream>.size)) == Z_OK else { return nil }
            defer { deflateEnd(&strm) }
            var out = [UInt8](repeating: 0, count: maxSize)
            let produced: Int? = out.withUnsafeMutableBytes { o in
                // SAFETY: as in inflateRaw; both buffers outlive the call.
                strm.next_in = UnsafeMutablePointer(mutating: input.baseAddress?.assumingMemoryBound(to: Bytef.self))
                strm.avail_in = uInt(input.count)
                strm.next_out = o.baseAddress?.assumingMemoryBound(to: Bytef.self)
                strm.avail_out = uInt(o.count)
                let r = deflate(&strm, Z_FINISH)
                guard r == Z_STREAM_END else { return nil }
                return o.count - Int(strm.avail_out)
            }
            guard let n = produced else { return nil }
            return Array(out[0..<n])
        case .zstd:
            var out = [UInt8](repeating: 0, count: maxSize)
            // SAFETY: `out` has `maxSize` bytes and zstd is told `o.count`; `input` is valid for
            // `input.count` bytes during the call.
            let n = out.withUnsafeMutableBytes { o in
                ZSTD_compress(o.baseAddress, o.count, input.baseAddress, input.count, 0)
            }
            if ZSTD_isError(n) != 0 || n >= maxSize { return nil }
            return Array(out[0..<n])
        }
    }
}

extension Qcow2Node {
    /// Reads part of a compressed cluster (guest `guestOffset` inside the cluster of `entry`).
    func readCompressed(entry: UInt64, guestOffset: Int64, into part: UnsafeMutableRawBufferPointer) async throws {
        let cs = clusterSize
        let inCluster = Int(guestOffset & Int64(cs - 1))
        if let cached = cachedDecompressed(entry) {
            // SAFETY: `cached` is one cluster and `inCluster + part.count <= clusterSize` (a part never
            // crosses a cluster).
            cached.withUnsafeBytes { part.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[inCluster..<(inCluster + part.count)])) }
            return
        }
        let (hostOffset, size) = compressedLocation(entry)
        let fileLength = hostFile.length
        if hostOffset >= fileLength {
            throw await signalCorruption("Compressed cluster at 0x\(String(hostOffset, radix: 16)) points past the end of the image file", offset: hostOffset)
        }
        let readable = Int(min(Int64(size), fileLength - hostOffset))
        let input = AlignedBuffer(count: max(readable, 1))
        let output = AlignedBuffer(count: cs)
        // SAFETY: `readable <= input.count`, so the rebased slice is inside `input`, alive for the
        // read.
        try await input.withUnsafeMutableBytes { b in
            await hostFile.debugEvent(.readCompressed)
            try await hostFile.read(at: hostOffset, into: UnsafeMutableRawBufferPointer(rebasing: b[0..<readable]))
        }
        let type = Qcow2CompressionType(rawValue: header.compressionType) ?? .zlib
        do {
            // SAFETY: both buffers are alive for the nested closures; the input slice is `0..<readable`
            // of `input`, and the output is exactly one cluster.
            try input.withUnsafeBytes { i in
                try output.withUnsafeMutableBytes { o in
                    try Qcow2Compression.decompress(type, UnsafeRawBufferPointer(rebasing: i[0..<readable]), into: o)
                }
            }
        } catch let e as BlockError {
            throw e.with(path: filename, offset: hostOffset, operation: "read compressed cluster")
        }
        // SAFETY: `output` is one cluster and `inCluster + part.count <= clusterSize`.
        output.withUnsafeBytes { part.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[inCluster..<(inCluster + part.count)])) }
        storeDecompressed(entry, output)
    }

    private func cachedDecompressed(_ entry: UInt64) -> AlignedBuffer? {
        decompressLock.withLock { decompressedCache?.entry == entry ? decompressedCache?.data : nil }
    }

    private func storeDecompressed(_ entry: UInt64, _ data: AlignedBuffer) {
        decompressLock.withLock { decompressedCache = (entry, data) }
    }
}
