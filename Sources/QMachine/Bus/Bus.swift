/// A device register window on the bus: MMIO (and, for x86, port I/O) accesses of 1, 2,
/// 4 or 8 bytes at an offset from the window's base. Values are little-endian, in the low
/// `size` bytes. Devices must be safe to call from any vCPU thread.
public protocol BusDevice: AnyObject, Sendable {
    func read(offset: UInt64, size: Int) -> UInt64
    func write(offset: UInt64, size: Int, value: UInt64)
}

/// Non-overlapping address ranges dispatching to devices (cloud-hypervisor's `Bus`).
/// Mapping is done while the machine is built; lookups afterwards take no lock.
// @unchecked: `ranges` is only changed by `map` while the machine is built, before the bus is shared;
// afterwards it is read-only (lookups take no lock).
public final class Bus: @unchecked Sendable {
    /// One mapping: `size` bytes from `base` dispatched to `device`.
    public struct Range: Sendable {
        /// The first address of the range.
        public let base: UInt64
        /// The length of the range in bytes.
        public let size: UInt64
        /// The device that handles accesses, at offsets relative to `base`.
        public let device: any BusDevice
    }

    /// Sorted by base.
    public private(set) var ranges: [Range] = []

    /// Creates a bus with nothing mapped.
    public init() {}

    /// Maps `device` at `[base, base+size)`.
    /// - Throws: ``MachineError`` `.busConflict` if the range overlaps one already mapped.
    public func map(base: UInt64, size: UInt64, device: any BusDevice) throws {
        guard size > 0, base &+ size > base else {
            throw MachineError(.invalidArgument, "empty or wrapping bus range at 0x\(String(base, radix: 16))", operation: "map device")
        }
        for r in ranges where base < r.base &+ r.size && r.base < base &+ size {
            throw MachineError(.busConflict, "device at 0x\(String(base, radix: 16)) overlaps the one at 0x\(String(r.base, radix: 16))",
                               address: base, operation: "map device")
        }
        ranges.append(Range(base: base, size: size, device: device))
        ranges.sort { $0.base < $1.base }
    }

    /// The device and offset for an access of `size` bytes at `address`, or nil.
    @inline(__always)
    public func find(_ address: UInt64, size: Int = 1) -> (device: any BusDevice, offset: UInt64)? {
        var lo = 0, hi = ranges.count
        while lo < hi {
            let mid = (lo + hi) / 2
            let r = ranges[mid]
            if address < r.base { hi = mid } else if address - r.base >= r.size { lo = mid + 1 } else {
                return address - r.base + UInt64(size) <= r.size ? (r.device, address - r.base) : nil
            }
        }
        return nil
    }

    /// Reads through the bus; nil if nothing is mapped there.
    public func read(_ address: UInt64, size: Int) -> UInt64? {
        guard let (d, off) = find(address, size: size) else { return nil }
        return d.read(offset: off, size: size)
    }

    /// Writes through the bus; false if nothing is mapped there.
    @discardableResult
    public func write(_ address: UInt64, size: Int, value: UInt64) -> Bool {
        guard let (d, off) = find(address, size: size) else { return false }
        d.write(offset: off, size: size, value: value)
        return true
    }
}
