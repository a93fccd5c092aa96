#if canImport(Glibc)
import Glibc
#endif
import CZlib
import CZstd
import QBlockCore

/// A reusable compressor for qcow2 clusters, producing exactly what QEMU's
/// `qcow2_co_compress` produces the format of: raw deflate (`windowBits = -12`, default
/// level, `memLevel` 9) or one zstd frame (default level).
///
/// The compression context and the output buffer are kept between clusters, so a copy loop
/// compresses without allocating. One instance per task: it is not thread-safe.
// @unchecked Sendable: it may be handed to another task, but is used by one at a time (the
// contract above); the compression contexts are never shared between instances.
public final class Qcow2ClusterCompressor: @unchecked Sendable {
    /// The compression algorithm (the image's `compression_type` header field).
    public let type: Qcow2CompressionType
    /// The cluster size in bytes; every input is one cluster.
    public let clusterSize: Int
    /// The compressed bytes of the last successful ``compress(_:)`` are at the start.
    public let output: AlignedBuffer
    private var zstream: UnsafeMutablePointer<z_stream>?
    private var cctx: OpaquePointer?

    /// - Throws: `.internalError` if the compression library cannot set up a context.
    public init(type: Qcow2CompressionType, clusterSize: Int) throws {
        self.type = type
        self.clusterSize = clusterSize
        output = AlignedBuffer(count: clusterSize)
        switch type {
        case .zlib:
            let z = UnsafeMutablePointer<z_stream>.allocate(capacity: 1)
            z.initialize(to: z_stream())
            guard deflateInit2_(z, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9, Z_DEFAULT_STRATEGY,
                                ZLIB_VERSION, Int32(MemoryLayout<z_stream>.size)) == Z_OK else {
                z.deallocate()
                throw BlockError(.internalError, "zlib: deflateInit2 failed")
            }
            zstream = z
        case .zstd:
            guard let c = ZSTD_createCCtx() else { throw BlockError(.internalError, "zstd: cannot create context") }
            cctx = c
        }
    }

    deinit {
        if let z = zstream {
            deflateEnd(z)
            z.deallocate()
        }
        if let c = cctx { ZSTD_freeCCtx(c) }
    }

    /// Compresses one cluster (`input.count` must be the cluster size). Returns the length of
    /// the compressed data in ``output``, or nil when it would not be smaller than the cluster
    /// minus one byte (QEMU's limit; the cluster is then written uncompressed).
    public func compress(_ input: UnsafeRawBufferPointer) -> Int? {
        let cap = clusterSize - 1
        let out = output.unsafeBase
        switch type {
        case .zlib:
            guard let z = zstream, deflateReset(z) == Z_OK else { return nil }
            // SAFETY: zlib reads `avail_in` bytes of `input` and writes at most `avail_out`
            // bytes into `output`; both outlive the call.
            z.pointee.next_in = UnsafeMutablePointer(mutating: input.baseAddress?.assumingMemoryBound(to: Bytef.self))
            z.pointee.avail_in = uInt(input.count)
            z.pointee.next_out = out.assumingMemoryBound(to: Bytef.self)
            z.pointee.avail_out = uInt(cap)
            let r = deflate(z, Z_FINISH)
            guard r == Z_STREAM_END else { return nil }
            return cap - Int(z.pointee.avail_out)
        case .zstd:
            guard let c = cctx else { return nil }
            let n = ZSTD_compressCCtx(c, out, cap, input.baseAddress, input.count, 0)
            if ZSTD_isError(n) != 0 || n >= cap { return nil }
            return n
        }
    }
}

/// Compressed cluster writes (QEMU's `qcow2_co_pwritev_compressed_task` and
/// `qcow2_alloc_bytes`).
///
/// Compressed data is packed with byte granularity: ``freeByteOffset`` remembers where the
/// last compressed cluster ended inside its host cluster, and the next one starts there; when
/// it does not fit, it continues into a newly allocated host cluster if that is the next one
/// in the file (so it straddles the boundary), else it starts at the new cluster. Every host
/// cluster a compressed cluster touches gets one reference for it. The L2 descriptor holds
/// the host byte offset in its low `62 - (cluster_bits - 8)` bits and, above them, the
/// number of 512-byte sectors the data spans beyond the first.
extension Qcow2Node {
    /// The compression type of the image (header field `compression_type`).
    public var compressionType: Qcow2CompressionType {
        Qcow2CompressionType(rawValue: header.compressionType) ?? .zlib
    }

    /// A compressor for this image's compression type and cluster size.
    public func makeCompressor() throws -> Qcow2ClusterCompressor {
        try Qcow2ClusterCompressor(type: compressionType, clusterSize: clusterSize)
    }

    /// Compresses and writes one guest cluster, as QEMU's compressed write does.
    ///
    /// - Parameters:
    ///   - guestOffset: a cluster-aligned guest offset.
    ///   - data: the cluster's bytes: a whole cluster, or the rest of the image for its last
    ///     cluster when the size is not cluster-aligned (padded with zeros for compression).
    /// - Throws: `.invalidArgument` for a misaligned request, `.unsupported` if the cluster
    ///   is already allocated (compressed writes cannot overwrite, as in QEMU), I/O errors.
    public func writeCompressedCluster(at guestOffset: Int64, data: UnsafeRawBufferPointer) async throws {
        try gate.enter(filename, "write compressed")
        defer { gate.leave() }
        let compressor = try makeCompressor()
        let cs = clusterSize
        if data.count == cs {
            let n = compressor.compress(data)
            try await writePrecompressedAdmitted(at: guestOffset, data: data, compressed: n.map {
                UnsafeRawBufferPointer(start: compressor.output.unsafeBase, count: $0)
            })
            if writeThrough.value { try await flushAdmitted(lazyRefcounts: true) }
            return
        }
        let padded = AlignedBuffer(count: cs)
        try checkCompressedRequest(guestOffset, data.count)
        // SAFETY: `padded` is one cluster and `data.count <= clusterSize` (checked by the caller);
        // `compress` only reads `padded` inside the closure.
        padded.withUnsafeMutableBytes { UnsafeMutableRawBufferPointer(rebasing: $0[0..<data.count]).copyMemory(from: data) }
        let n = padded.withUnsafeBytes { compressor.compress($0) }
        try await writePrecompressedAdmitted(at: guestOffset, data: data, compressed: n.map {
            UnsafeRawBufferPointer(start: compressor.output.unsafeBase, count: $0)
        })
        if writeThrough.value { try await flushAdmitted(lazyRefcounts: true) }
    }

    private func checkCompressedRequest(_ guestOffset: Int64, _ count: Int) throws {
        let cs = Int64(clusterSize)
        let size = Int64(header.size)
        guard guestOffset % cs == 0, count > 0,
              count == clusterSize || (count < clusterSize && guestOffset + Int64(count) == size) else {
            throw BlockError(.invalidArgument, "Compressed writes must cover whole clusters", errno: EINVAL,
                             path: filename, offset: guestOffset, operation: "write compressed")
        }
    }

    /// Writes one guest cluster whose data was already compressed (by a
    /// ``Qcow2ClusterCompressor`` of this image's type and cluster size), so that callers can
    /// compress many clusters concurrently and write them in order.
    ///
    /// - Parameters:
    ///   - data: the uncompressed bytes (written normally when `compressed` is nil).
    ///   - compressed: the compressed bytes, or nil when compression did not shrink the cluster.
    public func writePrecompressedCluster(at guestOffset: Int64, data: UnsafeRawBufferPointer,
                                          compressed: UnsafeRawBufferPointer?) async throws {
        try gate.enter(filename, "write compressed")
        defer { gate.leave() }
        try await writePrecompressedAdmitted(at: guestOffset, data: data, compressed: compressed)
    }

    /// ``writePrecompressedCluster(at:data:compressed:)`` for a request the gate already
    /// admitted (``writeCompressedCluster(at:data:)``): it does not enter the gate again.
    private func writePrecompressedAdmitted(at guestOffset: Int64, data: UnsafeRawBufferPointer,
                                            compressed: UnsafeRawBufferPointer?) async throws {
        try checkWritable("write compressed")
        try checkCompressedRequest(guestOffset, data.count)
        guard let compressed, compressed.count > 0 else {
            try await writeAdmitted(at: guestOffset, from: data, flags: [], placed: nil)
            return
        }
        defer { markBitmaps(guestOffset, Int64(data.count)) }
        let cluster = guestOffset >> Int64(clusterBits)
        let l1Index = Int(cluster / Int64(l2Entries))
        let l2Index = Int(cluster % Int64(l2Entries))
        // 1. Under the lock: check that nothing is there, take the bytes, mark the cluster in flight.
        var host: Int64 = 0
        let event = AsyncEvent()
        while true {
            await metaLock.lock()
            guard await waitForInflight(cluster, 1) else { continue }
            do {
                let m = try await lookup(guestOffset, Int64(clusterSize))
                if m.kind != .unallocated && m.kind != .zero {
                    throw BlockError(.unsupported, "Compression can't overwrite an allocated cluster", errno: EIO,
                                     path: filename, offset: guestOffset, operation: "write compressed")
                }
                host = try await allocateBytes(compressed.count)
                inflight.append(InflightAllocation(firstCluster: cluster, count: 1, done: event))
            } catch {
                metaLock.unlock()
                throw error
            }
            metaLock.unlock()
            break
        }
        // 2. Without it: the data. Unlike QEMU, which points L2 at the bytes first, the data is
        // written before any table refers to it, so a crash can only leak the bytes.
        var failure: Error?
        do {
            try await hostFile.write(at: host, from: compressed, flags: [])
        } catch {
            failure = error
        }
        // 3. Under the lock again: point the L2 entry at the data (or give the bytes back).
        await metaLock.lock()
        defer {
            inflight.removeAll { $0.done === event }
            metaLock.unlock()
            event.signal()
        }
        let cbits = Int64(clusterBits)
        let first = host >> cbits
        let clusters = ((host + Int64(compressed.count) - 1) >> cbits) - first + 1
        if let failure {
            await releaseUnreferenced(first, clusters)
            throw failure
        }
        do {
            let t = try await l2TableForWrite(l1Index)
            l2Cache.pin(t)
            defer { l2Cache.release(t) }
            // Before the entry changes: setting the dependency may write the L2 cache, and the
            // reference must not reach the disk before the count (unless lazy refcounts
            // marked the image dirty, as in a normal write).
            if !isDirty { try await l2Cache.setDependency(on: refcountCache) }
            let sectors = UInt64(((host + Int64(compressed.count) - 1) >> 9) - (host >> 9))
            let shift = UInt64(62 - (clusterBits - 8))
            t.bytes.setBE64(l2Index * 8, UInt64(host) | Qcow2Node.compressedFlag | (sectors << shift))
            l2Cache.markDirty(t)
        } catch {
            await releaseUnreferenced(first, clusters)
            throw error
        }
    }

    /// QEMU's `qcow2_alloc_bytes`: `size` bytes (at most a cluster) for compressed data,
    /// continuing where the last compressed cluster ended. Lock held.
    func allocateBytes(_ size: Int) async throws -> Int64 {
        let cs = Int64(clusterSize)
        let cbits = Int64(clusterBits)
        var offset = freeByteOffset
        if offset != 0 {
            let rc = try await refcount(of: offset >> cbits)
            // Full, or freed since (then it may be reused for anything): start afresh.
            if rc == maxRefcount || rc == 0 { offset = 0 }
        }
        var freeInCluster = cs - (offset & (cs - 1))
        while true {
            if offset == 0 || freeInCluster < Int64(size) {
                let newCluster = try await findFreeClusters(1)
                if offset == 0 || (offset + cs - 1) / cs * cs != newCluster << cbits {
                    offset = newCluster << cbits
                    freeInCluster = cs
                } else {
                    freeInCluster += cs
                }
            }
            let first = offset >> cbits
            let last = (offset + Int64(size) - 1) >> cbits
            if let missing = firstClusterWithoutBlock(first, last + 1) {
                // As QEMU: make the block, then start over in a new cluster.
                try await restartAfterNewBlock(first, missing)
                offset = 0
                continue
            }
            var c = first
            do {
                while c <= last {
                    try await updateRefcount(c, by: 1)
                    c += 1
                }
            } catch {
                await releaseUnreferenced(first, c - first)
                throw error
            }
            noteAllocated(first, last - first + 1)
            break
        }
        freeByteOffset = offset + Int64(size)
        if freeByteOffset & (cs - 1) == 0 { freeByteOffset = 0 }
        return offset
    }

    /// After the last compressed write: pads the host file to a whole 512-byte sector, as
    /// QEMU does when qemu-img convert signals the end of compressed output.
    public func finishCompressedWrites() async throws {
        try gate.enter(filename, "write compressed")
        defer { gate.leave() }
        try checkWritable("write compressed")
        let len = hostFile.length
        let aligned = (len + 511) / 512 * 512
        if aligned != len { try await hostFile.truncate(to: aligned, preallocation: .off) }
    }
}
