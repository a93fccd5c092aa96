/// A view of a node that forwards every request to it except ``close()``, which only
/// flushes: for a format node built for a while on a protocol node someone else owns
/// (`blockdev-create` writing a qcow2 image onto a `file` node of the graph).
///
/// After ``close()`` the view refuses every call with ``BlockError`` code `.closed`; the
/// node below stays open.
public final class UnclosedDriver: BlockDriver, @unchecked Sendable {
    // @unchecked: the stored properties are an immutable reference to a Sendable driver and
    // a CloseGate (thread-safe itself).
    /// The node requests go to.
    public let base: any BlockDriver
    private let gate = CloseGate()

    public init(_ base: any BlockDriver) { self.base = base }

    public var driverName: String { base.driverName }
    public var filename: String { base.filename }
    public var length: Int64 { base.length }
    public var isReadOnly: Bool { base.isReadOnly }
    public var requestAlignment: Int { base.requestAlignment }
    public var file: (any BlockDriver)? { base.file }
    public var backing: (any BlockDriver)? { base.backing }

    public func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws {
        try await gate.run(filename, "read") { try await base.read(at: offset, into: buffer) }
    }
    public func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags) async throws {
        try await gate.run(filename, "write") { try await base.write(at: offset, from: buffer, flags: flags) }
    }
    public func writeZeroes(at offset: Int64, length: Int64, flags: WriteFlags) async throws {
        try await gate.run(filename, "write zeroes") { try await base.writeZeroes(at: offset, length: length, flags: flags) }
    }
    public func discard(at offset: Int64, length: Int64) async throws {
        try await gate.run(filename, "discard") { try await base.discard(at: offset, length: length) }
    }
    public func flush() async throws { try await gate.run(filename, "flush") { try await base.flush() } }
    public func blockStatus(at offset: Int64, length: Int64) async throws -> BlockStatus {
        try await gate.run(filename, "block status") { try await base.blockStatus(at: offset, length: length) }
    }
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
