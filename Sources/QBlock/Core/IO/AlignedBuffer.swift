#if canImport(Glibc)
import Glibc
#endif

/// A heap buffer aligned for O_DIRECT I/O, owned by this object and freed with it.
///
/// Hand its memory to I/O calls only through ``withUnsafeMutableBytes(_:)`` or
/// ``withUnsafeBytes(_:)``, and only while the buffer is alive.
// @unchecked: `count`, `alignment` and `base` are immutable; the bytes behind `base` are only accessed
// inside `withUnsafe…Bytes` by the owner of the buffer, and an I/O call borrows them only while that
// owner awaits it.
public final class AlignedBuffer: @unchecked Sendable {
    /// The size of the buffer in bytes.
    public let count: Int
    /// The alignment of the memory in bytes (the `O_DIRECT` alignment it was made for).
    public let alignment: Int
    private let base: UnsafeMutableRawPointer
    /// What posix_memalign returned (`base` less the misalignment).
    private let allocation: UnsafeMutableRawPointer

    /// The size of a transparent huge page on the platforms we run on.
    static let hugePageSize = 2 << 20

    /// Allocates `count` bytes (at least one) aligned to `alignment`, zero-filled.
    /// With `hugePages`, a buffer of 2 MiB or more is aligned to 2 MiB and offered to the
    /// kernel for transparent huge pages: a copy loop's buffers then fault in once per 2 MiB
    /// rather than once per page, and copies into them miss the TLB far less.
    /// `misalignment` bytes (less than `alignment`) shift the start off the alignment, as
    /// qemu-io's `--misalign` does to exercise bounce buffering.
    public init(count: Int, alignment: Int = 4096, hugePages: Bool = false, misalignment: Int = 0) {
        let huge = hugePages && count >= AlignedBuffer.hugePageSize
        let align = huge ? max(alignment, AlignedBuffer.hugePageSize) : alignment
        let shift = max(0, min(misalignment, align - 1))
        self.count = count
        self.alignment = shift == 0 ? align : 1
        var p: UnsafeMutableRawPointer?
        let size = max(count, 1) + shift
        let rounded = (size + align - 1) / align * align
        if posix_memalign(&p, align, rounded) != 0 || p == nil {
            // Allocation failure of a few MiB is not a condition callers can handle either.
            preconditionFailure("out of memory allocating \(count) bytes")
        }
        allocation = p!
        base = allocation + shift
        // Only advice: where THP is off the buffer simply stays in small pages.
        if huge { _ = madvise(allocation, rounded, MADV_HUGEPAGE) }
        memset(allocation, 0, size)
    }

    deinit { free(allocation) }

    /// SAFETY: the pointer is valid for `count` bytes for the lifetime of `self`, which the
    /// caller keeps alive across the closure.
    public func withUnsafeMutableBytes<R>(_ body: (UnsafeMutableRawBufferPointer) throws -> R) rethrows -> R {
        try body(UnsafeMutableRawBufferPointer(start: base, count: count))
    }

    // SAFETY: `base` is valid for `count` bytes while `self` is alive; the caller holds `self` across
    // the closure.
    /// Calls `body` with the buffer's `count` bytes for reading; the pointer is valid only
    /// inside `body`.
    public func withUnsafeBytes<R>(_ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
        try body(UnsafeRawBufferPointer(start: base, count: count))
    }

    /// Async variants: the buffer is kept alive until `body` returns.
    // SAFETY: `withExtendedLifetime` keeps `self`, and so the `count` bytes at `base`, alive across
    // every suspension of `body`.
    public func withUnsafeMutableBytes<R>(_ body: (UnsafeMutableRawBufferPointer) async throws -> R) async rethrows -> R {
        defer { withExtendedLifetime(self) {} }
        return try await body(UnsafeMutableRawBufferPointer(start: base, count: count))
    }

    // SAFETY: as above: `self` is kept alive until `body` returns.
    /// Calls async `body` with the buffer's bytes for reading; the buffer is kept alive until
    /// `body` returns, across its suspensions.
    public func withUnsafeBytes<R>(_ body: (UnsafeRawBufferPointer) async throws -> R) async rethrows -> R {
        defer { withExtendedLifetime(self) {} }
        return try await body(UnsafeRawBufferPointer(start: base, count: count))
    }

    /// The contents as an array (for tests and small metadata).
    public var bytes: [UInt8] {
        // SAFETY: the bytes are copied into an array before the closure returns.
        withUnsafeBytes { Array($0) }
    }
}

/// A raw pointer that may cross into the I/O thread pool.
///
/// SAFETY: the async caller that created it awaits the pool job, so the memory it points
/// to outlives the job; nothing else touches the memory meanwhile.
// @unchecked: a plain pointer value; see the SAFETY note above for who may dereference it and when.
package struct SendablePointer: @unchecked Sendable {
    package let raw: UnsafeMutableRawPointer
    package init(raw: UnsafeMutableRawPointer) { self.raw = raw }
}

extension AlignedBuffer {
    /// The start of the memory. SAFETY: valid for `count` bytes while `self` is alive;
    /// used by owners (the qcow2 metadata cache) that keep the buffer alive as long as
    /// they hand the pointer out.
    package var unsafeBase: UnsafeMutableRawPointer { withUnsafeMutableBytes { $0.baseAddress! } }
}
