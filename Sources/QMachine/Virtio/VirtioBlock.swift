import QBlock
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// virtio-blk (Virtio 1.2, section 5.2 "Block Device") over any QBlock node.
///
/// Each request taken from the queue becomes one `Task` that awaits the node (read,
/// write, flush, discard, write-zeroes), so many requests are in flight at once; the
/// completion writes the status byte, publishes the used element (element, release fence,
/// index) and raises the interrupt unless the driver suppressed it. Data moves straight
/// between the node and guest RAM when the request has one data buffer, through a bounce
/// buffer otherwise. After data lands in guest RAM the `guestMemoryWritten` hook runs (the
/// software CPU invalidates translated code there).
///
/// Request layout (any framing, VIRTIO_F_VERSION_1 implies ANY_LAYOUT):
/// ```
/// readable:  type u32, reserved u32, sector u64 | data (OUT) or segments (DISCARD, WRITE_ZEROES)
/// writable:  data (IN, GET_ID) | status u8 (OK 0, IOERR 1, UNSUPP 2)
/// ```
// @unchecked: `queue`, `transport`, `inFlight`, `broken` and `completedCount` are only read and
// written with `lock` held (the public ``completed`` and ``requestsInFlight`` getters take it too);
// `guestMemoryWritten` is configuration set while the machine is built, before the device is shared;
// the lets are immutable (`config` included).
public final class VirtioBlock: VirtioDevice, @unchecked Sendable {
    /// virtio-blk feature bits (virtio 1.2 §5.2.3).
    public enum Feature {
        /// VIRTIO_BLK_F_SIZE_MAX: `size_max` in config limits one segment's bytes.
        public static let sizeMax: UInt64 = 1 << 1
        /// VIRTIO_BLK_F_SEG_MAX: `seg_max` in config limits the segments per request.
        public static let segMax: UInt64 = 1 << 2
        /// VIRTIO_BLK_F_RO: the device is read-only.
        public static let readOnly: UInt64 = 1 << 5
        /// VIRTIO_BLK_F_BLK_SIZE: `blk_size` in config gives the logical block size.
        public static let blkSize: UInt64 = 1 << 6
        /// VIRTIO_BLK_F_FLUSH: VIRTIO_BLK_T_FLUSH is supported.
        public static let flush: UInt64 = 1 << 9
        /// VIRTIO_BLK_F_DISCARD: VIRTIO_BLK_T_DISCARD is supported.
        public static let discard: UInt64 = 1 << 13
        /// VIRTIO_BLK_F_WRITE_ZEROES: VIRTIO_BLK_T_WRITE_ZEROES is supported.
        public static let writeZeroes: UInt64 = 1 << 14
    }
    /// Request types (`type` of the request header, §5.2.6).
    public enum RequestType: UInt32 {
        case read = 0, write = 1, flush = 4, getID = 8, discard = 11, writeZeroes = 13
    }
    /// The status byte the device writes at the end of each request.
    public enum Status: UInt8 { case ok = 0, ioError = 1, unsupported = 2 }
    /// virtio-blk sectors are always 512 bytes, whatever the block size.
    public static let sectorSize = 512
    /// Length in bytes of the VIRTIO_BLK_T_GET_ID reply (the serial, zero-padded).
    public static let idLength = 20
    static let maxDiscardSectors: UInt32 = 0x3f_ffff

    /// The block node the device reads and writes.
    public let node: any BlockDriver
    /// The serial number returned by GET_ID (at most 20 bytes are sent).
    public let serial: String
    /// Whether the device offers VIRTIO_BLK_F_RO and refuses writes.
    public let readOnly: Bool
    /// The most entries the driver may give the request queue.
    public let queueSize: UInt16
    /// Called with (guest address, length) after the device wrote guest RAM.
    public var guestMemoryWritten: (@Sendable (UInt64, UInt64) -> Void)?

    private let lock = DeviceLock()
    private var queue: Virtqueue?
    private var transport: (any VirtioTransportCallbacks)?
    private var inFlight = 0
    private var broken = false
    private let config: [UInt8]
    private var completedCount = 0
    // Safe from any thread: request tasks on the cooperative pool increment the count with
    // `lock` held, and this getter takes it too.
    /// Requests completed (statistics and tests).
    public var completed: Int { lock.withLock { completedCount } }
    /// Requests taken from the queue and not yet completed (`stop` waits for none).
    public var requestsInFlight: Int { lock.withLock { inFlight } }

    /// - Parameters:
    ///   - serial: the id GET_ID returns (at most 20 bytes are used).
    ///   - readOnly: offer VIRTIO_BLK_F_RO and fail writes (also implied by a read-only node).
    public init(node: any BlockDriver, serial: String = "", readOnly: Bool = false, queueSize: UInt16 = 256) {
        self.node = node
        self.serial = serial
        self.readOnly = readOnly || node.isReadOnly
        self.queueSize = queueSize
        config = Self.makeConfig(capacity: UInt64(node.length) / UInt64(Self.sectorSize), segMax: UInt32(queueSize) - 2)
    }

    /// Device ID 2 (block).
    public var deviceType: VirtioDeviceType { .block }
    /// One request queue of ``queueSize`` entries.
    public var queueMaxSizes: [UInt16] { [queueSize] }

    /// The features offered: version 1, indirect descriptors, event index, SEG_MAX, BLK_SIZE,
    /// FLUSH, and RO or DISCARD/WRITE_ZEROES.
    public var deviceFeatures: UInt64 {
        var f = VirtioFeature.version1 | VirtioFeature.ringIndirectDesc | VirtioFeature.ringEventIdx
            | Feature.segMax | Feature.blkSize | Feature.flush
        if readOnly { f |= Feature.readOnly } else { f |= Feature.discard | Feature.writeZeroes }
        return f
    }

    /// struct virtio_blk_config (Virtio 1.2, 5.2.4), little-endian.
    static func makeConfig(capacity: UInt64, segMax: UInt32) -> [UInt8] {
        var c = [UInt8](repeating: 0, count: 64)
        func put(_ v: UInt64, _ off: Int, _ n: Int) { for i in 0..<n { c[off + i] = UInt8(truncatingIfNeeded: v >> (8 * i)) } }
        put(capacity, 0, 8)                       // capacity (512-byte sectors)
        put(0, 8, 4)                              // size_max (not offered)
        put(UInt64(segMax), 12, 4)                // seg_max
        put(UInt64(sectorSize), 20, 4)            // blk_size
        put(UInt64(maxDiscardSectors), 36, 4)     // max_discard_sectors
        put(1, 40, 4)                             // max_discard_seg
        put(1, 44, 4)                             // discard_sector_alignment
        put(UInt64(maxDiscardSectors), 48, 4)     // max_write_zeroes_sectors
        put(1, 52, 4)                             // max_write_zeroes_seg
        c[56] = 1                                 // write_zeroes_may_unmap
        return c
    }

    /// Reads `size` (1...8) bytes of the config space (capacity, seg_max, blk_size, discard and
    /// write-zeroes limits) at `offset`, little-endian; out of range reads 0.
    public func readConfig(offset: Int, size: Int) -> UInt64 {
        guard offset >= 0, size > 0, size <= 8, offset + size <= config.count else { return 0 }
        var v: UInt64 = 0
        for i in 0..<size { v |= UInt64(config[offset + i]) << (8 * i) }
        return v
    }

    /// Ignored: no config field is writable (the device does not offer CONFIG_WCE).
    public func writeConfig(offset: Int, size: Int, value: UInt64) {}   // nothing writable (no CONFIG_WCE)

    /// Starts the device after FEATURES_OK and DRIVER_OK: takes queue 0 and uses the event
    /// index if `features` negotiated it.
    public func activate(features: UInt64, queues: [Virtqueue?], transport: any VirtioTransportCallbacks) {
        lock.withLock {
            queue = queues.first ?? nil
            queue?.eventIndex = features & VirtioFeature.ringEventIdx != 0
            self.transport = transport
            broken = false
        }
    }

    /// Resets the device: waits for requests in flight, then forgets the queue and transport.
    public func reset() {
        lock.withLock {
            while inFlight > 0 { lock.wait() }
            queue = nil
            transport = nil
            broken = false
        }
    }

    // MARK: - Taking requests

    /// The driver notified queue `index`: takes every available chain, answers the simple
    /// ones (GET_ID, malformed) at once and starts a task per I/O request; a malformed ring
    /// sets DEVICE_NEEDS_RESET.
    public func notify(queue index: Int) {
        guard index == 0 else { return }
        var failure: String?
        var interrupt = false
        var toStart: [Request] = []
        var reportTo: (any VirtioTransportCallbacks)?
        lock.withLock {
            // Taken under the lock: `activate` and `reset` change `transport` from other threads.
            reportTo = transport
            guard let q = queue, !broken else { return }
            let oldUsed = q.usedIndex
            while true {
                let chain: Virtqueue.Chain?
                do { chain = try q.pop() } catch { failure = "\(error)"; break }
                guard let chain else {
                    // Event-idx: ask for the next notification, then look once more for
                    // entries the driver made available without notifying.
                    if q.eventIndex && q.publishAvailEvent() { continue }
                    break
                }
                switch parse(chain, q) {
                case .start(let r):
                    inFlight += 1
                    toStart.append(r)
                case .done(let status, let statusAddress):
                    write(status: status, at: statusAddress)
                    q.push(head: chain.head, written: 1)
                    completedCount += 1
                case .broken(let why):
                    failure = why
                }
                if failure != nil { break }
            }
            if failure != nil { broken = true }
            interrupt = q.needsInterrupt(since: oldUsed)
        }
        if let failure { reportTo?.deviceNeedsReset("virtio-blk: \(failure)") }
        if interrupt { signal() }
        for r in toStart {
            Task.detached { [self] in await self.execute(r) }
        }
    }

    /// A request ready to run: where its data and status live in guest RAM (checked).
    // @unchecked: a value whose descriptor addresses were checked against guest RAM; it carries no
    // pointers, only guest-physical addresses.
    struct Request: @unchecked Sendable {
        var head: UInt16
        var type: RequestType
        var offset: Int64
        /// Data buffers, in order (guest addresses; each checked against RAM).
        var data: [Virtqueue.Descriptor]
        var dataLength: Int
        var statusAddress: UInt64
    }

    enum Parsed {
        case start(Request)
        case done(Status, UInt64)
        case broken(String)
    }

    /// Reads the header and classifies the request (under the lock, on the notifying thread).
    private func parse(_ chain: Virtqueue.Chain, _ q: Virtqueue) -> Parsed {
        // The status byte is the last writable byte.
        guard let last = chain.writable.last, last.length >= 1 else {
            return .broken("request \(chain.head) has no writable status byte")
        }
        let statusAddress = last.address + UInt64(last.length) - 1
        var writable = chain.writable
        if last.length == 1 { writable.removeLast() } else {
            writable[writable.count - 1].length -= 1
        }
        // The 16-byte header from the start of the readable buffers.
        guard chain.readableLength >= 16 else { return .done(.ioError, statusAddress) }
        var header = [UInt8](repeating: 0, count: 16)
        var readable = chain.readable
        do { try gather(&readable, into: &header, q.ram) } catch { return .broken("\(error)") }
        let rawType = UInt32(header[0]) | UInt32(header[1]) << 8 | UInt32(header[2]) << 16 | UInt32(header[3]) << 24
        var sector: UInt64 = 0
        for i in 0..<8 { sector |= UInt64(header[8 + i]) << (8 * i) }
        guard let type = RequestType(rawValue: rawType) else { return .done(.unsupported, statusAddress) }

        let capacityBytes = UInt64(node.length) / UInt64(Self.sectorSize) * UInt64(Self.sectorSize)
        func inRange(_ offset: UInt64, _ length: UInt64) -> Bool {
            offset <= capacityBytes && length <= capacityBytes - offset
        }
        switch type {
        case .read, .write:
            let data = type == .read ? writable : readable
            let len = data.reduce(0) { $0 + Int($1.length) }
            guard sector <= UInt64(Int64.max) / UInt64(Self.sectorSize) else { return .done(.ioError, statusAddress) }
            let off = sector * UInt64(Self.sectorSize)
            guard len % Self.sectorSize == 0, inRange(off, UInt64(len)) else { return .done(.ioError, statusAddress) }
            if type == .write && readOnly { return .done(.ioError, statusAddress) }
            if type == .read && !readable.isEmpty { return .done(.ioError, statusAddress) }
            return .start(Request(head: chain.head, type: type, offset: Int64(off), data: data, dataLength: len, statusAddress: statusAddress))
        case .flush:
            return .start(Request(head: chain.head, type: type, offset: 0, data: [], dataLength: 0, statusAddress: statusAddress))
        case .getID:
            return .start(Request(head: chain.head, type: type, offset: 0, data: writable,
                                  dataLength: writable.reduce(0) { $0 + Int($1.length) }, statusAddress: statusAddress))
        case .discard, .writeZeroes:
            if readOnly { return .done(.ioError, statusAddress) }
            let len = readable.reduce(0) { $0 + Int($1.length) }
            guard len > 0, len % 16 == 0 else { return .done(.ioError, statusAddress) }
            return .start(Request(head: chain.head, type: type, offset: 0, data: readable, dataLength: len, statusAddress: statusAddress))
        }
    }

    /// Copies bytes from the front of `buffers` into `out`, and drops them from `buffers`.
    private func gather(_ buffers: inout [Virtqueue.Descriptor], into out: inout [UInt8], _ ram: GuestRAM) throws {
        var filled = 0
        while filled < out.count, !buffers.isEmpty {
            let d = buffers[0]
            let n = min(Int(d.length), out.count - filled)
            let src = try host(ram, d.address, n)
            // SAFETY: `src` was bounds-checked by `host(_:_:_:)` for `n` bytes, and `filled + n <=
            // out.count`.
            out.withUnsafeMutableBytes { o in o.baseAddress!.advanced(by: filled).copyMemory(from: src, byteCount: n) }
            filled += n
            if n == Int(d.length) { buffers.removeFirst() } else {
                buffers[0].address += UInt64(n)
                buffers[0].length -= UInt32(n)
            }
        }
    }

    // MARK: - Running requests

    private func execute(_ r: Request) async {
        let status: Status
        var written = 0
        let ram = lock.withLock { queue?.ram }
        guard let ram else { finish(r, .ioError, 0); return }
        do {
            switch r.type {
            case .read:
                try await readData(r, ram)
                written = r.dataLength
                status = .ok
            case .write:
                try await writeData(r, ram)
                status = .ok
            case .flush:
                try await node.flush()
                status = .ok
            case .getID:
                var id = Array(serial.utf8.prefix(Self.idLength))
                if id.count < Self.idLength { id.append(0) }
                written = try copyOut(id, to: r.data, ram)
                status = .ok
            case .discard, .writeZeroes:
                status = try await ranges(r, ram)
            }
        } catch {
            status = .ioError
        }
        finish(r, status, written)
    }

    private func readData(_ r: Request, _ ram: GuestRAM) async throws {
        if r.data.count == 1 {
            let d = r.data[0]
            let p = UnsafeMutableRawBufferPointer(start: try host(ram, d.address, Int(d.length)), count: Int(d.length))
            try await node.read(at: r.offset, into: p)
        } else if r.dataLength > 0 {
            let buf = AlignedBuffer(count: r.dataLength)
            // SAFETY: `buf` has `dataLength` bytes, the sum of the (checked) descriptor lengths; both
            // closures stay within it.
            try await buf.withUnsafeMutableBytes { try await node.read(at: r.offset, into: $0) }
            try buf.withUnsafeBytes { src in
                var o = 0
                for d in r.data {
                    try host(ram, d.address, Int(d.length)).copyMemory(from: src.baseAddress! + o, byteCount: Int(d.length))
                    o += Int(d.length)
                }
            }
        }
        if let hook = guestMemoryWritten { for d in r.data { hook(d.address, UInt64(d.length)) } }
    }

    private func writeData(_ r: Request, _ ram: GuestRAM) async throws {
        if r.data.count == 1 {
            let d = r.data[0]
            let p = UnsafeRawBufferPointer(start: try host(ram, d.address, Int(d.length)), count: Int(d.length))
            try await node.write(at: r.offset, from: p, flags: [])
        } else if r.dataLength > 0 {
            let buf = AlignedBuffer(count: r.dataLength)
            // SAFETY: `buf` has `dataLength` bytes, the sum of the descriptor lengths, and each source
            // was bounds-checked by `host(_:_:_:)`.
            try buf.withUnsafeMutableBytes { dst in
                var o = 0
                for d in r.data {
                    (dst.baseAddress! + o).copyMemory(from: try host(ram, d.address, Int(d.length)), byteCount: Int(d.length))
                    o += Int(d.length)
                }
            }
            try await buf.withUnsafeBytes { try await node.write(at: r.offset, from: $0, flags: []) }
        }
    }

    /// DISCARD and WRITE_ZEROES: segments of {sector u64, num_sectors u32, flags u32 (UNMAP 1)}.
    private func ranges(_ r: Request, _ ram: GuestRAM) async throws -> Status {
        var bytes = [UInt8](repeating: 0, count: r.dataLength)
        var data = r.data
        try gather(&data, into: &bytes, ram)
        let capacity = node.length / Int64(Self.sectorSize) * Int64(Self.sectorSize)
        for s in stride(from: 0, to: bytes.count, by: 16) {
            var sector: UInt64 = 0
            for i in 0..<8 { sector |= UInt64(bytes[s + i]) << (8 * i) }
            var count: UInt32 = 0, flags: UInt32 = 0
            for i in 0..<4 { count |= UInt32(bytes[s + 8 + i]) << (8 * i); flags |= UInt32(bytes[s + 12 + i]) << (8 * i) }
            guard count <= Self.maxDiscardSectors, sector <= UInt64(capacity) / UInt64(Self.sectorSize) else { return .ioError }
            let off = Int64(sector) * Int64(Self.sectorSize), len = Int64(count) * Int64(Self.sectorSize)
            guard len <= capacity - off else { return .ioError }
            if r.type == .discard {
                guard flags == 0 else { return .unsupported }
                do { try await node.discard(at: off, length: len) } catch let e as BlockError where e.code == .unsupported {}
            } else {
                guard flags & ~1 == 0 else { return .unsupported }
                try await node.writeZeroes(at: off, length: len, flags: flags & 1 != 0 ? [.mayUnmap] : [])
            }
        }
        return .ok
    }

    private func copyOut(_ bytes: [UInt8], to buffers: [Virtqueue.Descriptor], _ ram: GuestRAM) throws -> Int {
        var o = 0
        for d in buffers where o < bytes.count {
            let n = min(Int(d.length), bytes.count - o)
            let dst = try host(ram, d.address, n)
            // SAFETY: `dst` was bounds-checked by `host(_:_:_:)` for `n` bytes, and `o + n <=
            // bytes.count`.
            bytes.withUnsafeBytes { dst.copyMemory(from: $0.baseAddress! + o, byteCount: n) }
            guestMemoryWritten?(d.address, UInt64(n))
            o += n
        }
        return o
    }

    private func write(status: Status, at address: UInt64) {
        guard let q = queue, let p = q.ram.pointer(at: address, count: 1) else { return }
        // SAFETY: `pointer(at:count: 1)` checked the status byte is inside RAM.
        p.storeBytes(of: status.rawValue, as: UInt8.self)
    }

    /// The host address of `count` bytes of guest RAM, through GuestRAM's checked accessor
    /// (the chain walk checked them already; this keeps every access checked).
    private func host(_ ram: GuestRAM, _ address: UInt64, _ count: Int) throws -> UnsafeMutableRawPointer {
        guard let p = ram.pointer(at: address, count: UInt64(count)) else {
            throw VirtqueueError("buffer 0x\(String(address, radix: 16))+\(count) outside RAM")
        }
        return p
    }

    private func finish(_ r: Request, _ status: Status, _ written: Int) {
        let interrupt: Bool = lock.withLock {
            defer {
                inFlight -= 1
                if inFlight == 0 { lock.broadcast() }
            }
            guard let q = queue else { return false }
            write(status: status, at: r.statusAddress)
            let old = q.usedIndex
            q.push(head: r.head, written: UInt32(written + 1))
            completedCount += 1
            return q.needsInterrupt(since: old)
        }
        if interrupt { signal() }
    }

    private func signal() {
        lock.withLock { transport }?.signalUsedBuffers(queue: 0)
    }
}
