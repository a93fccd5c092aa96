#if canImport(Glibc)
import Glibc
#endif
import QBlockCore
import QBlockGraph

/// The `null-co` and `null-aio` protocol nodes (QEMU's `block/null.c`): a disk of a given
/// size that stores nothing, for tests and benchmarks.
///
/// Writes succeed and are dropped. Reads either fill the buffer with zeros (``readZeroes``)
/// or, by default as in QEMU 7.2, leave the caller's buffer untouched: the content of a
/// null disk is undefined, and QEMU uses that to measure the block layer without a
/// `memset`. Block status says the same: every range is "allocated here" at its own offset,
/// reading as zeros only with ``readZeroes``. Each request waits ``latencyNanoseconds``
/// first. The size is fixed (QEMU's null driver cannot be resized); discards are hints and
/// do nothing, flushes succeed.
// @unchecked Sendable: no mutable state besides the close gate, which is thread-safe.
public final class NullNode: BlockDriver, @unchecked Sendable {
    /// `null-co` or `null-aio` (they behave the same here: every request is asynchronous).
    public let driverName: String
    /// The size in bytes.
    public let length: Int64
    /// Whether reads return zeros (else they leave the buffer as it was).
    public let readZeroes: Bool
    /// How long each request waits before it completes, in nanoseconds.
    public let latencyNanoseconds: Int64
    /// Whether the node refuses writes (opened read-only, or reopened so).
    public var isReadOnly: Bool { readOnlyFlag.value }
    private let readOnlyFlag = LockedFlag()
    private let gate = CloseGate()

    /// Creates a null node.
    /// - Parameters:
    ///   - driverName: `null-co` or `null-aio`.
    ///   - length: the size in bytes (QEMU's default is 1 GiB).
    ///   - readZeroes: reads fill the buffer with zeros.
    ///   - latencyNanoseconds: the delay of every request.
    ///   - readOnly: refuse writes.
    public init(driverName: String = "null-co", length: Int64 = 1 << 30, readZeroes: Bool = false,
                latencyNanoseconds: Int64 = 0, readOnly: Bool = false) {
        self.driverName = driverName
        self.length = length
        self.readZeroes = readZeroes
        self.latencyNanoseconds = latencyNanoseconds
        readOnlyFlag.set(readOnly)
    }

    /// `null-co://` or `null-aio://`.
    public var filename: String { "\(driverName)://" }
    /// Any alignment.
    public var requestAlignment: Int { 1 }
    /// None: a protocol node.
    public var file: (any BlockDriver)? { nil }
    /// None.
    public var backing: (any BlockDriver)? { nil }

    private func delay() async {
        if latencyNanoseconds > 0 { try? await Task.sleep(nanoseconds: UInt64(latencyNanoseconds)) }
    }

    private func checkWritable(_ op: String) throws {
        if isReadOnly { throw BlockError(.readOnly, "Block node is read-only", errno: EPERM, path: filename, operation: op) }
    }

    /// Zeros with ``readZeroes``, else nothing (see the type's description).
    /// - Throws: `.closed` after ``close()``.
    public func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws {
        try await gate.run(filename, "read") {
            if readZeroes, let base = buffer.baseAddress { memset(base, 0, buffer.count) }
            await delay()
        }
    }

    /// Drops the data.
    /// - Throws: `.readOnly`, `.closed`.
    public func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags) async throws {
        try await gate.run(filename, "write") { try checkWritable("write"); await delay() }
    }

    /// Drops the request (QEMU falls back to a write, which the node drops).
    /// - Throws: `.readOnly`, `.closed`.
    public func writeZeroes(at offset: Int64, length: Int64, flags: WriteFlags) async throws {
        try await gate.run(filename, "write zeroes") { try checkWritable("write zeroes"); await delay() }
    }

    /// A hint with nothing to free: does nothing.
    /// - Throws: `.readOnly`, `.closed`.
    public func discard(at offset: Int64, length: Int64) async throws {
        try gate.check(filename, "discard")
        try checkWritable("discard")
    }

    /// Nothing to flush.
    /// - Throws: `.closed`.
    public func flush() async throws {
        try await gate.run(filename, "flush") { await delay() }
    }

    /// The whole range, allocated at its own offset; zeros with ``readZeroes``.
    /// - Throws: `.closed`.
    public func blockStatus(at offset: Int64, length: Int64) async throws -> BlockStatus {
        try gate.check(filename, "block status")
        return BlockStatus(flags: readZeroes ? [.zero, .allocated] : [], length: length, hostOffset: offset)
    }

    /// Refuses, as QEMU's null driver.
    /// - Throws: ``BlockError`` `.unsupported`.
    public func truncate(to length: Int64, preallocation: Preallocation) async throws {
        throw BlockError(.unsupported, "Image format driver does not support resize", errno: ENOTSUP, path: filename, operation: "truncate")
    }

    /// Closes the node after the requests in flight.
    public func close() async throws {
        guard await gate.beginClose() else { return }
        await gate.drain()
        gate.finishClose()
    }
}

extension NullNode: ReopenableDriver {
    /// Switches between read-only and read-write (QEMU's null driver reopens with any
    /// mode); there is no host cache to change.
    public func reopen(readOnly: Bool, cache: CacheMode) async throws { readOnlyFlag.set(readOnly) }
}
