#if canImport(Glibc)
import Glibc
#endif
import QBlockCore
import QBlockGraph

/// The engine behind `img bench` (qemu-img bench): `count` requests of `bufferSize` bytes,
/// `depth` of them in flight at once, starting at `offset` and advancing by `step`
/// (wrapping at the end of the image).
public struct Bench: Sendable {
    /// Requests to issue (`-c`).
    public var count = 75000
    /// Requests in flight at once (`-d`).
    public var depth = 64
    /// Bytes per request (`-s`).
    public var bufferSize = 4096
    /// Distance between request offsets; 0 means `bufferSize`.
    public var step = 0
    /// Issue writes instead of reads (`-w`).
    public var write = false
    /// Offset of the first request, in bytes (`-o`).
    public var offset: Int64 = 0
    /// The byte written by write requests.
    public var pattern: UInt8 = 0
    /// Issue a flush every this many requests (0: never).
    public var flushInterval = 0
    /// Wait for requests in flight to finish before each flush.
    public var drain = true

    /// Creates qemu-img bench's defaults: 75000 reads of 4 KiB, 64 in flight, from offset 0.
    public init() {}

    /// The distance between request offsets actually used: ``step``, or ``bufferSize`` when it is 0.
    public var effectiveStep: Int { step == 0 ? bufferSize : step }

    /// Checks the parameters as qemu-img does.
    /// - Throws: ``BlockError`` `.invalidArgument` with qemu-img's message.
    public func validate() throws {
        if depth < 1 { throw BlockError(.invalidArgument, "Invalid queue depth specified") }
        if count < 0 { throw BlockError(.invalidArgument, "Invalid request count specified") }
        if flushInterval > 0 && flushInterval < depth {
            throw BlockError(.invalidArgument, "Flush interval can't be smaller than depth")
        }
    }

    /// Runs the requests against `node` and returns the elapsed wall time in seconds.
    /// - Throws: ``BlockError`` from the first failed request; a request reaching past the
    ///   end of the image fails with EIO, as in QEMU.
    public func run(on node: any BlockDriver) async throws -> Double {
        try validate()
        let size = node.length
        let bufSize = bufferSize
        let isWrite = write
        let buffers = (0..<min(depth, max(count, 1))).map { _ in AlignedBuffer(count: max(bufSize, 1)) }
        if isWrite {
            for b in buffers { b.withUnsafeMutableBytes { _ = memset($0.baseAddress!, Int32(pattern), $0.count) } }
        }
        var next = offset
        let stepSize = Int64(effectiveStep)
        func nextOffset() -> Int64 {
            let o = next
            next += stepSize
            next = size == 0 ? 0 : next % size
            return o
        }
        @Sendable func request(_ buf: AlignedBuffer, _ off: Int64) async throws {
            if off < 0 || off + Int64(bufSize) > size {
                throw BlockError(.io, BlockError.strerror(EIO), errno: EIO, path: node.filename, offset: off, operation: "bench")
            }
            if bufSize == 0 { return }
            if isWrite {
                try await buf.withUnsafeBytes { b in
                    try await node.write(at: off, from: UnsafeRawBufferPointer(rebasing: b[0..<bufSize]), flags: [])
                }
            } else {
                try await buf.withUnsafeMutableBytes { b in
                    try await node.read(at: off, into: UnsafeMutableRawBufferPointer(rebasing: b[0..<bufSize]))
                }
            }
        }
        let start = Self.now()
        try await withThrowingTaskGroup(of: Int.self) { group in
            var submitted = 0
            var free = Array(buffers.indices)
            while submitted < count || !group.isEmpty {
                while submitted < count && !free.isEmpty {
                    let slot = free.removeLast()
                    let off = nextOffset()
                    let buf = buffers[slot]
                    group.addTask { try await request(buf, off); return slot }
                    submitted += 1
                    if flushInterval > 0 && submitted % flushInterval == 0 {
                        if drain {
                            while let s = try await group.next() { if s >= 0 { free.append(s) } }
                            try await node.flush()
                        } else {
                            group.addTask { try await node.flush(); return -1 }
                        }
                    }
                }
                if let s = try await group.next(), s >= 0 { free.append(s) }
            }
        }
        return Self.now() - start
    }

    static func now() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }
}
