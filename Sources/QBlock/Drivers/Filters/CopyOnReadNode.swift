import QBlockCore
import QBlockGraph
/// The `copy-on-read` filter (QEMU's `block/copy-on-read.c`): data a read finds below its
/// child — in the backing chain, above `base` — is written into the child, so that the
/// child gradually stops depending on its backing files. `block-stream` copies through
/// one of these.
///
/// Copies are made a cluster at a time under a ``RangeLock``; writes through the filter
/// take the same lock, so a copy never overwrites newer data, and a read of a cluster
/// being copied waits for the copy.
///
/// The filter does not own its child unless made with `ownsChild` (qemu-io's `-C`, where
/// closing the image closes the filter and its child); after ``close()`` (which waits for
/// the requests in flight) every call throws ``BlockError`` with code `.closed`.
// @unchecked Sendable: every stored property is immutable or thread-safe itself (RangeLock, CloseGate).
public final class CopyOnReadNode: BlockFilter, @unchecked Sendable {
    /// `copy-on-read`, as QEMU names the filter.
    public let driverName = "copy-on-read"
    /// The node reads copy into (the top of the chain).
    public let child: any BlockDriver
    /// Data at or below this node is not copied (a stream's base); nil: copy all. QMP's
    /// `bottom` option names the lowest node that *is* copied: its backing node is this.
    public let base: (any BlockDriver)?
    /// Serializes copies and writes on overlapping clusters.
    public let ranges = RangeLock()
    let granularity: Int64
    private let gate = CloseGate()
    /// Whether ``close()`` closes the child too.
    let ownsChild: Bool

    /// - Parameters:
    ///   - child: the image to copy into.
    ///   - base: the first node whose data is not copied (the stream base).
    ///   - ownsChild: close the child when the filter closes.
    public init(child: any BlockDriver, base: (any BlockDriver)? = nil, ownsChild: Bool = false) {
        self.child = child
        self.base = base
        self.ownsChild = ownsChild
        granularity = Int64(child.formatClusterSize ?? 65536)
    }

    /// The child's file name.
    public var filename: String { child.filename }
    /// The child's length in bytes.
    public var length: Int64 { child.length }
    /// Whether the child is read-only.
    public var isReadOnly: Bool { child.isReadOnly }
    /// The child's alignment in bytes.
    public var requestAlignment: Int { child.requestAlignment }
    /// The filtered child, as QEMU's `file` child of the filter.
    public var file: (any BlockDriver)? { child }
    /// The node below the filter.
    public var filteredChild: any BlockDriver { child }
    /// Always `nil`: a filter has no backing child of its own.
    public var backing: (any BlockDriver)? { nil }

    /// Reads `buffer.count` bytes at `offset`; data that comes from the backing chain is
    /// written into the top image first (whole clusters, under the range lock), as QEMU's
    /// `copy-on-read` filter does.
    /// - Throws: ``BlockError`` `.closed` after ``close()``, or the child's error.
    public func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws {
        try await gate.run(filename, "read") { try await readAdmitted(at: offset, into: buffer) }
    }

    private func readAdmitted(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws {
        var pos = 0
        while pos < buffer.count {
            let at = offset + Int64(pos)
            let want = Int64(buffer.count - pos)
            let (copy, n) = try await needsCopy(at: at, length: want)
            let part = UnsafeMutableRawBufferPointer(rebasing: buffer[pos..<pos + Int(n)])
            if copy {
                _ = try await copyAdmitted(at: at, length: n, into: part)
            } else {
                try await child.read(at: at, into: part)
            }
            pos += Int(n)
        }
    }

    /// Whether the run at `offset` comes from below the child but above `base`.
    func needsCopy(at offset: Int64, length: Int64) async throws -> (Bool, Int64) {
        // The image below any filters on the child holds the allocation and the backing link.
        let image = child.skippingFilters
        let st = try await image.blockStatus(at: offset, length: length)
        if st.flags.contains(.allocated) || image.backing == nil { return (false, st.length) }
        let above = try await ChainStatus.isAllocatedAbove(image.backing, base: base, at: offset, length: st.length)
        return (above.allocated, above.length)
    }

    /// Copies the clusters covering `[offset, offset+length)` into the child where it
    /// does not allocate them yet (a stream job's step), and fills `out` when given.
    /// - Returns: the bytes written into the child.
    @discardableResult
    public func copyOnRead(at offset: Int64, length: Int64, into out: UnsafeMutableRawBufferPointer? = nil) async throws -> Int64 {
        try await gate.run(filename, "copy on read") { try await copyAdmitted(at: offset, length: length, into: out) }
    }

    private func copyAdmitted(at offset: Int64, length: Int64, into out: UnsafeMutableRawBufferPointer?) async throws -> Int64 {
        let start = offset / granularity * granularity
        let end = min(child.length, (offset + length + granularity - 1) / granularity * granularity)
        return try await ranges.withRange(start, end) {
            let buf = AlignedBuffer(count: Int(end - start))
            var written: Int64 = 0
            // SAFETY: `buf` covers the whole aligned range copied; the async closure keeps it alive
            // across the read and the write.
            try await buf.withUnsafeMutableBytes { b in
                var pos = start
                while pos < end {
                    // Look again under the lock: a write may have allocated the run meanwhile.
                    let (copy, n) = try await needsCopy(at: pos, length: end - pos)
                    let part = UnsafeMutableRawBufferPointer(rebasing: b[Int(pos - start)..<Int(pos - start + n)])
                    try await child.read(at: pos, into: part)
                    if copy {
                        if part.allSatisfy({ $0 == 0 }) {
                            try await child.writeZeroes(at: pos, length: n, flags: [])
                        } else {
                            try await child.write(at: pos, from: UnsafeRawBufferPointer(part), flags: [])
                        }
                        written += n
                    }
                    pos += n
                }
                if let out {
                    out.copyMemory(from: UnsafeRawBufferPointer(rebasing: b[Int(offset - start)..<Int(offset - start) + out.count]))
                }
            }
            return written
        }
    }

    /// Runs a write-like request holding its clusters.
    func serialized(_ offset: Int64, _ length: Int64, _ operation: String, _ body: () async throws -> Void) async throws {
        try gate.enter(filename, operation)
        defer { gate.leave() }
        let start = offset / granularity * granularity
        let end = (offset + length + granularity - 1) / granularity * granularity
        try await ranges.withRange(start, end, body)
    }

    /// Writes `buffer` at `offset`, serialized with copies of the same clusters.
    /// - Throws: ``BlockError`` `.closed` after ``close()``, or the child's error.
    public func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags) async throws {
        try await serialized(offset, Int64(buffer.count), "write") { try await child.write(at: offset, from: buffer, flags: flags) }
    }

    /// Writes zeroes over `length` bytes at `offset`, serialized with copies of the same
    /// clusters.
    /// - Throws: ``BlockError`` `.closed` after ``close()``, or the child's error.
    public func writeZeroes(at offset: Int64, length: Int64, flags: WriteFlags) async throws {
        try await serialized(offset, length, "write zeroes") { try await child.writeZeroes(at: offset, length: length, flags: flags) }
    }

    /// Discards `length` bytes at `offset`, serialized with copies of the same clusters.
    /// - Throws: ``BlockError`` `.closed` after ``close()``, or the child's error.
    public func discard(at offset: Int64, length: Int64) async throws {
        try await serialized(offset, length, "discard") { try await child.discard(at: offset, length: length) }
    }

    /// Flushes the child.
    /// - Throws: ``BlockError`` `.closed` after ``close()``, or the child's error.
    public func flush() async throws { try await gate.run(filename, "flush") { try await child.flush() } }

    /// The child's allocation status for the range.
    /// - Throws: ``BlockError`` `.closed` after ``close()``, or the child's error.
    public func blockStatus(at offset: Int64, length: Int64) async throws -> BlockStatus {
        try await gate.run(filename, "block status") { try await child.blockStatus(at: offset, length: length) }
    }

    /// Resizes the child to `length` bytes.
    /// - Throws: ``BlockError`` `.closed` after ``close()``, or the child's error.
    public func truncate(to length: Int64, preallocation: Preallocation) async throws {
        try await gate.run(filename, "truncate") { try await child.truncate(to: length, preallocation: preallocation) }
    }

    /// A filter does not own its child: closing it only waits for the requests in flight;
    /// the filter refuses every call afterwards.
    public func close() async throws {
        guard await gate.beginClose() else { return }
        await gate.drain()
        gate.finishClose()
        if ownsChild { try await child.close() }
    }
}
