#if canImport(Glibc)
import Glibc
#endif

/// Guest RAM: one anonymous mapping at a guest-physical base address.
///
/// The CPU's fast path and DMA-capable devices access it through raw pointers; every
/// such access first checks the guest-physical range with ``contains(_:count:)`` or goes
/// through ``pointer(at:count:)``, which does the check.
// @unchecked: `base`, `size` and `host` are immutable; the guest memory behind `host` is shared with
// vCPUs and devices like real RAM, every access bounds-checked (concurrent guest/device access is the
// guest's business, as on hardware).
public final class GuestRAM: @unchecked Sendable {
    /// Guest-physical address of the first byte.
    public let base: UInt64
    /// Size in bytes.
    public let size: UInt64
    /// Host address of the first byte. Valid until the RAM is deallocated (deinit).
    public let host: UnsafeMutableRawPointer

    /// - Throws: ``MachineError`` `.outOfMemory` when the host refuses the mapping.
    public init(base: UInt64, size: UInt64) throws {
        guard size > 0, size % 4096 == 0 else {
            throw MachineError(.invalidArgument, "RAM size \(size) is not a positive multiple of 4096", operation: "allocate RAM")
        }
        let p = mmap(nil, Int(size), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        guard let p, p != MAP_FAILED else {
            throw MachineError(.outOfMemory, "cannot allocate \(size) bytes of guest RAM", operation: "allocate RAM")
        }
        self.base = base
        self.size = size
        self.host = p
    }

    deinit { munmap(host, Int(size)) }

    /// True if `count` bytes at guest-physical `address` lie inside RAM.
    @inline(__always)
    public func contains(_ address: UInt64, count: UInt64) -> Bool {
        address >= base && address &- base <= size &- count && count <= size
    }

    /// Host pointer for `count` bytes at guest-physical `address`, or nil if the range is
    /// not entirely inside RAM.
    @inline(__always)
    public func pointer(at address: UInt64, count: UInt64) -> UnsafeMutableRawPointer? {
        contains(address, count: count) ? host + Int(address &- base) : nil
    }

    /// Copies bytes into RAM (loaders, device DMA).
    /// - Throws: `.invalidArgument` if the range is outside RAM.
    public func write(_ bytes: UnsafeRawBufferPointer, at address: UInt64) throws {
        guard let dst = pointer(at: address, count: UInt64(bytes.count)) else {
            throw MachineError(.invalidArgument, "guest range 0x\(String(address, radix: 16))+\(bytes.count) is outside RAM",
                               address: address, operation: "write RAM")
        }
        // SAFETY: the range was checked against the mapping just above.
        if let src = bytes.baseAddress { dst.copyMemory(from: src, byteCount: bytes.count) }
    }

    /// Copies bytes out of RAM.
    public func read(into buffer: UnsafeMutableRawBufferPointer, at address: UInt64) throws {
        guard let src = pointer(at: address, count: UInt64(buffer.count)) else {
            throw MachineError(.invalidArgument, "guest range 0x\(String(address, radix: 16))+\(buffer.count) is outside RAM",
                               address: address, operation: "read RAM")
        }
        // SAFETY: the range was checked against the mapping just above.
        if let dst = buffer.baseAddress { dst.copyMemory(from: src, byteCount: buffer.count) }
    }
}
