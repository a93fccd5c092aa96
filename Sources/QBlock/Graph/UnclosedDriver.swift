/// A view of a node that forwards every request to it except ``close()``, which only
/// flushes: for a format node built for a while on a protocol node someone else owns
/// (`blockdev-create` writing a qcow2 image onto a `file` node of the graph).
///
/// After ``close()`` the view refuses every call with ``BlockError`` code `.closed`; the
/// node below stays open.
// @unchecked: no mutable state of its own: `base` is an immutable reference to a Sendable driver,
// `gate` (CloseGate) is thread-safe.
public final class UnclosedDriver: BlockDriver, @unchecked Sendable {
    // @unchecked: the stored properties are an immutable reference to a Sendable driver and
    // a CloseGate (thread-safe itself).
    /// The node requests go to.
    public let base: any BlockDriver
    private let gate = CloseGate()

    /// Wraps `base`, which someone else owns and closes.
    public init(_ base: any BlockDriver) { self.base = base }

    /// The base's driver name.
    public var driverName: String { base.driverName }
    /// The base's file name.
    public var filename: String { base.filename }
    /// The base's size, in bytes.
    public var length: Int64 { base.length }
    /// Whether the base refuses writes.
    public var isReadOnly: Bool { base.isReadOnly }
    /// The base's request alignment, in bytes.
    public var requestAlignment: Int { base.requestAlignment }
    /// The base's protocol child, if any.
    public var file: (any BlockDriver)? { base.file }
    /// The base's backing image, if any.
    public var backing: (any BlockDriver)? { base.backing }

    /// Reads from the base.
    public func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws {
        try await gate.run(filename, "read") { try await base.read(at: offset, into: buffer) }
    }
    /// Writes to the base.
    public func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags) async throws {
        try await gate.run(filename, "write") { try await base.write(at: offset, from: buffer, flags: flags) }
    }
    /// Zeroes a range of the base.
    public func writeZeroes(at offset: Int64, length: Int64, flags: WriteFlags) async throws {
        try await gate.run(filename, "write zeroes") { try await base.writeZeroes(at: offset, length: length, flags: flags) }
    }
    /// Discards a range of the base.
    public func discard(at offset: Int64, length: Int64) async throws {
        try await gate.run(filename, "discard") { try await base.discard(at: offset, length: length) }
    }
    /// Flushes the base.
    public func flush() async throws { try await gate.run(filename, "flush") { try await base.flush() } }
    /// The base's allocation status at `offset`.
    public func blockStatus(at offset: Int64, length: Int64) async throws -> BlockStatus {
        try await gate.run(filename, "block status") { try await base.blockStatus(at: offset, length: length) }
    }
    /// Resizes the base.
    public func truncate(to length: Int64, preallocation: Preallocation) async throws {
        try await gate.run(filename, "truncate") { try await base.truncate(to: length, preallocation: preallocation) }
    }
    /// Waits for the requests in flight and flushes; the node itself stays open.
    public func close() async throws {
        guard await gate.beginClose() else { return }
        defer { gate.finishClose() }
        await gate.drain()
        try await base.flush()
    }
}
