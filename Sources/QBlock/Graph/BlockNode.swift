import QBlockBitmaps
/// A named node of the block graph: a format or protocol driver plus what the graph keeps
/// for every node, whatever its driver (QEMU's `BlockDriverState` around a `BlockDriver`):
/// the node name and the runtime dirty bitmaps that writes through the node mark.
///
/// A node is itself a ``BlockDriver`` that forwards to its driver, so it can stand as the
/// backing file of an overlay (a live snapshot makes the old top node the overlay's
/// backing) and be wrapped by filters and backends. Persistent qcow2 bitmaps are the
/// qcow2 driver's own (it marks them); ``bitmaps`` holds the ones that live only in memory.
// @unchecked: no mutable stored state: `nodeName` and `driver` are immutable, `bitmaps`
// (DirtyBitmapSet) and `watch` are thread-safe themselves.
public final class BlockNode: BlockDriver, @unchecked Sendable {
    /// The node name (`node-name` in QMP), unique in its graph.
    public let nodeName: String
    /// The driver doing the I/O.
    public let driver: any BlockDriver
    /// Runtime dirty bitmaps; every successful write, write-zeroes and discard through
    /// this node marks the enabled ones.
    public let bitmaps = DirtyBitmapSet()
    /// Write threshold, highest offset written, discard counts (see ``NodeIOWatch``).
    public let watch = NodeIOWatch()

    /// Wraps `driver` as the node named `nodeName` (QMP's `node-name`).
    public init(nodeName: String, driver: any BlockDriver) {
        self.nodeName = nodeName
        self.driver = driver
    }

    /// The driver's name (`qcow2`, `raw`, `file`, …).
    public var driverName: String { driver.driverName }
    /// The driver's file name.
    public var filename: String { driver.filename }
    /// The size the guest sees, in bytes.
    public var length: Int64 { driver.length }
    /// Whether the driver refuses writes.
    public var isReadOnly: Bool { driver.isReadOnly }
    /// The driver's request alignment, in bytes.
    public var requestAlignment: Int { driver.requestAlignment }
    /// The driver's protocol child, if any.
    public var file: (any BlockDriver)? { driver.file }
    /// The driver's backing image, if any.
    public var backing: (any BlockDriver)? { driver.backing }

    /// Reads `buffer.count` bytes at `offset` through the driver.
    /// - Throws: the driver's error.
    public func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws {
        try await driver.read(at: offset, into: buffer)
    }

    /// Writes `buffer` at `offset` through the driver, then marks the enabled dirty bitmaps and
    /// updates ``watch`` (the write threshold fires before the write is issued).
    /// - Throws: the driver's error (nothing is marked then).
    public func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags) async throws {
        watch.willWrite(offset: offset, length: Int64(buffer.count))
        try await driver.write(at: offset, from: buffer, flags: flags)
        bitmaps.mark(offset: offset, length: Int64(buffer.count))
        watch.didWrite(end: offset + Int64(buffer.count))
    }

    /// Makes `length` bytes at `offset` read as zeros, then marks the dirty bitmaps and ``watch``.
    /// - Throws: the driver's error.
    public func writeZeroes(at offset: Int64, length: Int64, flags: WriteFlags) async throws {
        watch.willWrite(offset: offset, length: length)
        try await driver.writeZeroes(at: offset, length: length, flags: flags)
        bitmaps.mark(offset: offset, length: length)
        watch.didWrite(end: offset + length)
    }

    /// Discards `length` bytes at `offset`, counting the discard in ``watch`` whether it
    /// succeeds or not, and marks the dirty bitmaps on success.
    /// - Throws: the driver's error.
    public func discard(at offset: Int64, length: Int64) async throws {
        watch.willWrite(offset: offset, length: length)
        do { try await driver.discard(at: offset, length: length) } catch {
            watch.didDiscard(length: length, ok: false)
            throw error
        }
        watch.didDiscard(length: length, ok: true)
        bitmaps.mark(offset: offset, length: length)
        watch.didWrite(end: offset + length)
    }

    /// Flushes the driver to stable storage.
    /// - Throws: the driver's error.
    public func flush() async throws { try await driver.flush() }

    /// The driver's allocation status of the run at `offset`.
    /// - Throws: the driver's error.
    public func blockStatus(at offset: Int64, length: Int64) async throws -> BlockStatus {
        try await driver.blockStatus(at: offset, length: length)
    }

    /// Resizes the driver to `length` bytes and the runtime dirty bitmaps with it.
    /// - Throws: the driver's error.
    public func truncate(to length: Int64, preallocation: Preallocation) async throws {
        try await driver.truncate(to: length, preallocation: preallocation)
        bitmaps.resize(to: driver.length)
    }

    /// Closes the driver (and with it the chain it owns).
    /// - Throws: the driver's error, e.g. a final flush that failed.
    public func close() async throws { try await driver.close() }
}

extension BlockDriver {
    /// The driver below any graph wrappers (a ``BlockNode``'s driver, recursively), for
    /// format-specific operations such as qcow2's backing link.
    public var innermostDriver: any BlockDriver {
        var d: any BlockDriver = self
        while let n = d as? BlockNode { d = n.driver }
        return d
    }
}
