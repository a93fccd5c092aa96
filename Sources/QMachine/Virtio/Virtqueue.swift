import Synchronization

/// A split virtqueue (Virtio 1.2, section 2.7 "Split Virtqueues") in guest RAM:
///
/// ```
/// descriptor table  16 bytes × size:  addr u64, len u32, flags u16 (NEXT 1, WRITE 2, INDIRECT 4), next u16
/// available ring    flags u16 (NO_INTERRUPT 1), idx u16, ring[size] u16, (used_event u16)
/// used ring         flags u16 (NO_NOTIFY 1), idx u16, ring[size] {id u32, len u32}, (avail_event u16)
/// ```
/// All fields are little-endian. Every guest address is checked against ``GuestRAM`` before
/// it is touched; a malformed ring or chain throws ``VirtqueueError`` and never reads or
/// writes outside RAM.
// @unchecked: `lastAvail`, `usedIndex` and `eventIndex` are only touched by the owning device with its
// DeviceLock held; the addresses and `ram` are immutable.
public final class Virtqueue: @unchecked Sendable {
    /// One buffer of a chain, in guest-physical memory.
    public struct Descriptor: Sendable, Equatable {
        /// Guest-physical address of the buffer.
        public var address: UInt64
        /// Length of the buffer in bytes.
        public var length: UInt32
        /// Whether the device writes it (VIRTQ_DESC_F_WRITE) rather than reads it.
        public var writable: Bool
    }

    /// One request: the head index to return in the used ring, and its buffers in order
    /// (device-readable first, then device-writable).
    public struct Chain: Sendable {
        /// The index of the chain's first descriptor, returned in the used ring.
        public var head: UInt16
        /// The device-readable buffers, in order.
        public var readable: [Descriptor]
        /// The device-writable buffers, in order.
        public var writable: [Descriptor]
        /// Total bytes of the readable buffers.
        public var readableLength: Int { readable.reduce(0) { $0 + Int($1.length) } }
        /// Total bytes of the writable buffers.
        public var writableLength: Int { writable.reduce(0) { $0 + Int($1.length) } }
    }

    enum Flag { static let next: UInt16 = 1, write: UInt16 = 2, indirect: UInt16 = 4 }
    /// VIRTQ_AVAIL_F_NO_INTERRUPT: the driver asks not to be interrupted (without EVENT_IDX).
    public static let availNoInterrupt: UInt16 = 1

    /// The guest memory holding the rings and buffers.
    public let ram: GuestRAM
    /// The number of entries in each ring (a power of two, at most 32768).
    public let size: UInt16
    /// Guest-physical address of the descriptor table (16 bytes per entry).
    public let descAddress: UInt64
    /// Guest-physical address of the available (driver) ring.
    public let availAddress: UInt64
    /// Guest-physical address of the used (device) ring.
    public let usedAddress: UInt64
    /// The next available-ring entry to take.
    public private(set) var lastAvail: UInt16 = 0
    /// The next used-ring index to publish.
    public private(set) var usedIndex: UInt16 = 0
    /// VIRTIO_F_EVENT_IDX was negotiated: interrupts follow the driver's used_event, and the
    /// device publishes avail_event (Virtio 1.2, 2.7.7 and 2.7.10).
    public var eventIndex = false

    /// - Throws: ``VirtqueueError`` when the size is not a power of two or a ring lies
    ///   outside RAM or is misaligned.
    public init(ram: GuestRAM, size: UInt16, desc: UInt64, avail: UInt64, used: UInt64) throws {
        guard size > 0, size & (size - 1) == 0 else { throw VirtqueueError("queue size \(size) is not a power of two") }
        let n = UInt64(size)
        guard desc % 16 == 0, avail % 2 == 0, used % 4 == 0 else { throw VirtqueueError("misaligned ring address") }
        guard ram.contains(desc, count: 16 * n) else { throw VirtqueueError("descriptor table 0x\(String(desc, radix: 16)) outside RAM") }
        guard ram.contains(avail, count: 6 + 2 * n) else { throw VirtqueueError("available ring 0x\(String(avail, radix: 16)) outside RAM") }
        guard ram.contains(used, count: 6 + 8 * n) else { throw VirtqueueError("used ring 0x\(String(used, radix: 16)) outside RAM") }
        self.ram = ram
        self.size = size
        descAddress = desc
        availAddress = avail
        usedAddress = used
    }

    // MARK: - Little-endian access to checked ring addresses

    @inline(__always) private func load16(_ a: UInt64) -> UInt16 {
        // SAFETY: every address was checked against RAM (rings in init, indirect tables in
        // walk); indirect tables may be misaligned, so loads never assume alignment.
        UInt16(littleEndian: ram.host.loadUnaligned(fromByteOffset: Int(a - ram.base), as: UInt16.self))
    }
    @inline(__always) private func load32(_ a: UInt64) -> UInt32 {
        UInt32(littleEndian: ram.host.loadUnaligned(fromByteOffset: Int(a - ram.base), as: UInt32.self))
    }
    @inline(__always) private func load64(_ a: UInt64) -> UInt64 {
        UInt64(littleEndian: ram.host.loadUnaligned(fromByteOffset: Int(a - ram.base), as: UInt64.self))
    }
    // SAFETY: `init` checked that the descriptor table and both rings lie inside RAM, and every address
    // passed here is inside them; `storeBytes` needs no alignment.
    @inline(__always) private func store16(_ a: UInt64, _ v: UInt16) {
        ram.host.storeBytes(of: v.littleEndian, toByteOffset: Int(a - ram.base), as: UInt16.self)
    }
    @inline(__always) private func store32(_ a: UInt64, _ v: UInt32) {
        ram.host.storeBytes(of: v.littleEndian, toByteOffset: Int(a - ram.base), as: UInt32.self)
    }

    /// The driver's available index.
    public var availIndex: UInt16 { load16(availAddress + 2) }
    /// The available ring's flags (NO_INTERRUPT).
    public var availFlags: UInt16 { load16(availAddress) }

    /// Takes the next available chain, or nil when the ring is empty.
    /// - Throws: ``VirtqueueError`` when the ring or the chain is malformed; the entry is
    ///   consumed (so a caller that fails the request moves on) unless the available index
    ///   itself is impossible.
    public func pop() throws -> Chain? {
        let avail = availIndex
        if avail == lastAvail { return nil }
        if avail &- lastAvail > size {
            throw VirtqueueError("available index \(avail) is more than \(size) ahead of \(lastAvail)")
        }
        // Read the ring entry only after the index (the driver wrote the entry first).
        atomicMemoryFence(ordering: .acquiring)
        let head = load16(availAddress + 4 + 2 * UInt64(lastAvail % size))
        lastAvail &+= 1
        return try walk(head: head)
    }

    /// Parses the chain starting at `head` (Virtio 1.2, 2.7.5 and 2.7.5.3 "Indirect Descriptors").
    public func walk(head: UInt16) throws -> Chain {
        guard head < size else { throw BadChain(head: head, why: "head index \(head) >= queue size \(size)") }
        var chain = Chain(head: head, readable: [], writable: [])
        var table = descAddress
        var tableSize = UInt64(size)
        var index = UInt64(head)
        var seen = 0
        var inIndirect = false
        var total: UInt64 = 0
        while true {
            seen += 1
            guard seen <= Int(tableSize) + (inIndirect ? 1 : 0) else { throw BadChain(head: head, why: "descriptor loop") }
            let d = table + 16 * index
            let addr = load64(d), len = load32(d + 8), flags = load16(d + 12), next = load16(d + 14)
            if flags & Flag.indirect != 0 {
                guard !inIndirect else { throw BadChain(head: head, why: "nested indirect table") }
                guard flags & Flag.next == 0 else { throw BadChain(head: head, why: "indirect descriptor with NEXT") }
                guard len > 0, len % 16 == 0, ram.contains(addr, count: UInt64(len)) else {
                    throw BadChain(head: head, why: "indirect table 0x\(String(addr, radix: 16))+\(len) invalid")
                }
                table = addr
                tableSize = UInt64(len / 16)
                index = 0
                seen = 0
                inIndirect = true
                continue
            }
            guard ram.contains(addr, count: UInt64(len)) else {
                throw BadChain(head: head, why: "buffer 0x\(String(addr, radix: 16))+\(len) outside RAM")
            }
            total += UInt64(len)
            guard total <= 1 << 32 else { throw BadChain(head: head, why: "chain longer than 4 GiB") }
            let writable = flags & Flag.write != 0
            if writable {
                chain.writable.append(Descriptor(address: addr, length: len, writable: true))
            } else {
                guard chain.writable.isEmpty else { throw BadChain(head: head, why: "readable descriptor after a writable one") }
                chain.readable.append(Descriptor(address: addr, length: len, writable: false))
            }
            guard flags & Flag.next != 0 else { break }
            guard UInt64(next) < tableSize else { throw BadChain(head: head, why: "next index \(next) out of range") }
            index = UInt64(next)
        }
        return chain
    }

    /// Whether the driver wants an interrupt now that the used index moved from `old` to
    /// ``usedIndex``: with event-idx, when the move crossed used_event (vring_need_event);
    /// without, unless the available ring's NO_INTERRUPT flag is set.
    public func needsInterrupt(since old: UInt16) -> Bool {
        guard old != usedIndex else { return false }
        atomicMemoryFence(ordering: .sequentiallyConsistent)
        if eventIndex {
            let event = load16(availAddress + 4 + 2 * UInt64(size))   // used_event
            return usedIndex &- event &- 1 < usedIndex &- old
        }
        return availFlags & Self.availNoInterrupt == 0
    }

    /// Tells the driver (event-idx) to notify again once it makes entry ``lastAvail``
    /// available; then, after a full fence, whether entries arrived meanwhile.
    /// - Returns: true if the available ring holds entries not yet taken.
    public func publishAvailEvent() -> Bool {
        store16(usedAddress + 4 + 8 * UInt64(size), lastAvail)      // avail_event
        atomicMemoryFence(ordering: .sequentiallyConsistent)
        return availIndex != lastAvail
    }

    /// Publishes a used element: writes it, then (after a release fence) the used index.
    public func push(head: UInt16, written: UInt32) {
        let slot = usedAddress + 4 + 8 * UInt64(usedIndex % size)
        store32(slot, UInt32(head))
        store32(slot + 4, written)
        atomicMemoryFence(ordering: .releasing)
        usedIndex &+= 1
        store16(usedAddress + 2, usedIndex)
        // The index must be visible before the driver is interrupted and reads it.
        atomicMemoryFence(ordering: .sequentiallyConsistent)
    }
}

/// A malformed ring.
public struct VirtqueueError: Error, CustomStringConvertible, Sendable {
    public let description: String
    public init(_ d: String) { description = d }
}

/// A malformed chain: the head is known, so the request can be failed and returned.
public struct BadChain: Error, CustomStringConvertible, Sendable {
    /// The head index of the malformed chain (returned in the used ring with an error status).
    public let head: UInt16
    /// What is wrong with it, for the log.
    public let why: String
    public var description: String { "descriptor chain at \(head): \(why)" }
}
