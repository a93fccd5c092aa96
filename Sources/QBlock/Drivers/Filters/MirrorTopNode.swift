import QBlockBitmaps
import QBlockCore
import QBlockGraph
/// How a mirror treats writes that arrive while it runs (QAPI's `MirrorCopyMode`).
public enum MirrorCopyMode: String, Sendable, CaseIterable {
    /// Writes go to the source and mark the job's dirty bitmap; the job copies later.
    case background
    /// A write completes once it reached both the source and the target, so a writer
    /// faster than the copy adds no new work and the mirror converges.
    case writeBlocking = "write-blocking"
}

/// The filter a mirror inserts above its source (QEMU's `mirror_top` node): every user of
/// the source is switched to it, so that it sees every write. Reads pass through.
///
/// In background mode a completed write marks the dirty bitmap and wakes the job. In
/// write-blocking mode the write is then also written to the target as whole copy units
/// (parts of a unit the write does not cover are read back from the source), holding those
/// units in the ``RangeLock`` the job's copies take too; they are clean afterwards. Before a flush completes, new dirty bits reach the persistent bitmap
/// file when there is one.
///
/// The filter owns neither node; after ``close()`` (which waits for the requests in flight)
/// every call throws ``BlockError`` with code `.closed`.
// @unchecked Sendable: `mode`, `onDirty` and `sideFile` are only touched with `lock` held;
// the other stored properties are immutable or thread-safe themselves.
public final class MirrorTopNode: BlockFilter, @unchecked Sendable {
    /// `mirror_top`, as QEMU names the filter a mirror job inserts.
    public let driverName = "mirror_top"
    /// The source node.
    public let source: any BlockDriver
    let target: any BlockDriver
    let bitmap: DirtyBitmap
    /// The job's copy unit (a multiple of the bitmap's granularity).
    let align: Int64
    /// Whether writes to the target must cover whole units: the target has clusters, and
    /// would fill the rest of one from its backing file.
    let wholeUnits: Bool
    /// With a side file: the bits it persists — a superset of ``bitmap`` whose bits are
    /// cleared only once the target holds the copied data durably (by the job's persist step).
    let persistent: DirtyBitmap?
    /// Copies and write-blocking writes on overlapping clusters exclude each other.
    let ranges: RangeLock
    private let lock = PosixMutex()
    private var mode: MirrorCopyMode
    private var onDirty: (@Sendable () -> Void)?
    private var sideFile: BitmapSideFile?
    private let gate = CloseGate()

    package init(source: any BlockDriver, target: any BlockDriver, bitmap: DirtyBitmap, align: Int64, persistent: DirtyBitmap?, ranges: RangeLock,
         mode: MirrorCopyMode, sideFile: BitmapSideFile?, onDirty: @escaping @Sendable () -> Void) {
        self.source = source
        self.target = target
        self.bitmap = bitmap
        self.align = align
        wholeUnits = target.formatClusterSize != nil
        self.persistent = persistent
        self.ranges = ranges
        self.mode = mode
        self.sideFile = sideFile
        self.onDirty = onDirty
    }

    /// Stops copying to the target and waking the job (the job is ending); writes still mark the bitmap.
    package func detachJob() {
        lock.withLock {
            mode = .background
            onDirty = nil
        }
    }

    /// The source's file name.
    public var filename: String { source.filename }
    /// The source's length in bytes.
    public var length: Int64 { source.length }
    /// Whether the source is read-only.
    public var isReadOnly: Bool { source.isReadOnly }
    /// The source's alignment in bytes.
    public var requestAlignment: Int { source.requestAlignment }
    /// Always `nil`: the source is the filter's only child (QEMU links it as `backing`).
    public var file: (any BlockDriver)? { nil }
    /// The source, as QEMU's `mirror_top` links it.
    public var backing: (any BlockDriver)? { source }
    /// The source node being mirrored.
    public var filteredChild: any BlockDriver { source }

    /// Reads from the source.
    /// - Throws: ``BlockError`` `.closed` after ``close()``, or the source's error.
    public func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws {
        try await gate.run(filename, "read") { try await source.read(at: offset, into: buffer) }
    }

    /// Runs a write-like request on the source, then on the target (write-blocking) or marks it dirty.
    private func mirrored(_ offset: Int64, _ length: Int64, toSource: () async throws -> Void,
                          toTarget: () async throws -> Void) async throws {
        let (current, wake) = lock.withLock { (mode, onDirty) }
        guard current == .writeBlocking else {
            try await toSource()
            markDirty(offset, length)
            wake?()
            return
        }
        // The write goes to the target as whole copy units: a part of a unit alone would
        // make the target fill the rest of its cluster from its own backing file (not linked
        // during the job, or holding older data than the source), hiding the source's data.
        // So a unit the write covers only in part is read back from the source, which holds
        // the new data and, under the range lock, nothing newer.
        // A target without clusters (raw, NBD) takes the write as it is: nothing is filled in.
        let start = offset / align * align
        let end = min(self.length, (offset + length + align - 1) / align * align)
        try await ranges.withRange(start, end) {
            try await toSource()
            do {
                if !wholeUnits || (start == offset && end == offset + length) {
                    try await toTarget()
                } else {
                    let buf = AlignedBuffer(count: Int(end - start))
                    // SAFETY: `buf` covers the whole range copied; the async closure keeps it alive
                    // across the read and the write.
                    try await buf.withUnsafeMutableBytes { b in
                        try await source.read(at: start, into: b)
                        try await target.write(at: start, from: UnsafeRawBufferPointer(b), flags: [])
                    }
                }
            } catch {
                // The target missed it: copy it later.
                markDirty(offset, length)
                wake?()
                return
            }
            // Every unit the write touched now matches on both sides (for a target that
            // took the write as it is, the units the write covers entirely).
            if wholeUnits {
                bitmap.reset(offset: start, length: end - start)
            } else {
                let fullStart = (offset + align - 1) / align * align
                let fullEnd = (offset + length) == self.length ? self.length : (offset + length) / align * align
                if fullEnd > fullStart { bitmap.reset(offset: fullStart, length: fullEnd - fullStart) }
            }
        }
    }

    /// Marks the job's bitmap, then the persistent one (in that order: the job's persist
    /// step rebuilds the persistent bits from the job's).
    func markDirty(_ offset: Int64, _ length: Int64) {
        bitmap.mark(offset: offset, length: length)
        persistent?.mark(offset: offset, length: length)
    }

    /// Writes `buffer` at `offset` to the source and, depending on the copy mode, also to the
    /// target (`write-blocking`) or marks the range dirty for the job (`background`).
    /// - Throws: ``BlockError`` `.closed` after ``close()``, or the source's or target's error.
    public func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags) async throws {
        try gate.enter(filename, "write")
        defer { gate.leave() }
        try await mirrored(offset, Int64(buffer.count),
                           toSource: { try await source.write(at: offset, from: buffer, flags: flags) },
                           toTarget: { try await target.write(at: offset, from: buffer, flags: flags) })
    }

    /// Writes zeroes over `length` bytes at `offset` to the source and, as for ``write(at:from:flags:)``,
    /// to the target or the dirty bitmap.
    /// - Throws: ``BlockError`` `.closed` after ``close()``, or the source's or target's error.
    public func writeZeroes(at offset: Int64, length: Int64, flags: WriteFlags) async throws {
        try gate.enter(filename, "write zeroes")
        defer { gate.leave() }
        try await mirrored(offset, length,
                           toSource: { try await source.writeZeroes(at: offset, length: length, flags: flags) },
                           toTarget: { try await target.writeZeroes(at: offset, length: length, flags: flags) })
    }

    /// Discards `length` bytes at `offset` in the source and marks the range dirty, so the job
    /// copies whatever the source then reads as.
    /// - Throws: ``BlockError`` `.closed` after ``close()``, or the source's error.
    public func discard(at offset: Int64, length: Int64) async throws {
        try gate.enter(filename, "discard")
        defer { gate.leave() }
        // What a discarded range reads as depends on the source: copy whatever it is later.
        try await source.discard(at: offset, length: length)
        markDirty(offset, length)
        lock.withLock { onDirty }?()
    }

    /// Flushes the source; with a persistent bitmap, its new dirty bits are durable first,
    /// so that no write acknowledged by this flush can be missing from the file.
    public func flush() async throws {
        try gate.enter(filename, "flush")
        defer { gate.leave() }
        let (side, current) = lock.withLock { (sideFile, mode) }
        if let side { try await side.syncNewlyDirty() }
        try await source.flush()
        // Write-blocking writes cleared their bits: the target must hold them durably too.
        if current == .writeBlocking { try await target.flush() }
    }

    /// The source's allocation status for the range.
    /// - Throws: ``BlockError`` `.closed` after ``close()``, or the source's error.
    public func blockStatus(at offset: Int64, length: Int64) async throws -> BlockStatus {
        try await gate.run(filename, "block status") { try await source.blockStatus(at: offset, length: length) }
    }

    /// Always fails: a node cannot be resized while it is mirrored (QEMU refuses too).
    /// - Throws: ``BlockError`` `.busy` (or `.closed` after ``close()``).
    public func truncate(to length: Int64, preallocation: Preallocation) async throws {
        try gate.check(filename, "truncate")
        throw BlockError(.busy, "Cannot resize a node that is being mirrored", operation: "truncate")
    }

    /// A filter does not own the source: closing it only waits for the requests in flight;
    /// the filter refuses every call afterwards.
    public func close() async throws {
        guard await gate.beginClose() else { return }
        await gate.drain()
        gate.finishClose()
    }
}
