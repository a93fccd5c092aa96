import QBlock

/// The virtio-mmio transport, version 2 ("modern"), Virtio 1.2 section 4.2.2:
///
/// ```
/// 0x000 MagicValue "virt"   0x004 Version 2   0x008 DeviceID   0x00c VendorID
/// 0x010 DeviceFeatures      0x014 DeviceFeaturesSel
/// 0x020 DriverFeatures      0x024 DriverFeaturesSel
/// 0x030 QueueSel  0x034 QueueNumMax  0x038 QueueNum  0x044 QueueReady
/// 0x050 QueueNotify  0x060 InterruptStatus  0x064 InterruptACK  0x070 Status
/// 0x080/0x084 QueueDescLow/High  0x090/0x094 QueueDriverLow/High  0x0a0/0x0a4 QueueDeviceLow/High
/// 0x0ac SHMSel  0x0b0/0x0b4 SHMLen  0x0b8/0x0bc SHMBase  0x0c0 QueueReset
/// 0x0fc ConfigGeneration    0x100+ device configuration space
/// ```
/// A slot without a device reads DeviceID 0, which drivers skip.
// @unchecked: every register var and `storedLastError` are only read and written with `lock` held
// (the public ``lastError`` getter takes it too); the lets are immutable, `queueCount` included, so
// the queue-notify path can check a queue index without the lock.
public final class VirtioMMIO: BusDevice, VirtioTransportCallbacks, @unchecked Sendable {
    /// The size in bytes of one virtio-mmio register window (4 KiB, as QEMU maps them).
    public static let windowSize: UInt64 = 0x1000
    /// The `MagicValue` register: "virt" in little-endian.
    public static let magic: UInt32 = 0x7472_6976      // "virt"
    /// The `VendorID` register value.
    public static let vendorID: UInt32 = 0x554d_4551   // "QEMU", as QEMU's devices report

    enum Reg: UInt64 {
        case magic = 0x000, version = 0x004, deviceID = 0x008, vendorID = 0x00c
        case deviceFeatures = 0x010, deviceFeaturesSel = 0x014
        case driverFeatures = 0x020, driverFeaturesSel = 0x024
        case queueSel = 0x030, queueNumMax = 0x034, queueNum = 0x038, queueReady = 0x044
        case queueNotify = 0x050, interruptStatus = 0x060, interruptACK = 0x064, status = 0x070
        case queueDescLow = 0x080, queueDescHigh = 0x084
        case queueDriverLow = 0x090, queueDriverHigh = 0x094
        case queueDeviceLow = 0x0a0, queueDeviceHigh = 0x0a4
        case shmSel = 0x0ac, shmLenLow = 0x0b0, shmLenHigh = 0x0b4, shmBaseLow = 0x0b8, shmBaseHigh = 0x0bc
        case queueReset = 0x0c0
        case configGeneration = 0x0fc
    }
    static let configBase: UInt64 = 0x100

    enum InterruptBit { static let usedBuffer: UInt32 = 1, configChange: UInt32 = 2 }

    struct QueueRegs {
        var num: UInt16 = 0
        var ready = false
        var desc: UInt64 = 0
        var driver: UInt64 = 0
        var device: UInt64 = 0
    }

    /// The device behind this slot, or `nil` for an empty slot (DeviceID 0).
    public let device: (any VirtioDevice)?
    private let ram: GuestRAM
    private let irq: any InterruptLine
    private let lock = DeviceLock()
    private var deviceFeaturesSel: UInt32 = 0
    private var driverFeaturesSel: UInt32 = 0
    private var driverFeatures: UInt64 = 0
    private var queueSel: UInt32 = 0
    private var queues: [QueueRegs]
    /// `queues.count`, fixed at init: read on the notify path outside the lock.
    private let queueCount: Int
    private var status = VirtioStatus()
    private var interruptStatus: UInt32 = 0
    private var configGeneration: UInt32 = 0
    private var lineLevel = false
    // Safe from any thread: written by `deviceNeedsReset` (an I/O completion thread) and read
    // here with `lock` held, so a reader never sees a String being replaced.
    /// Why the device asked for a reset, for diagnostics.
    public var lastError: String? { lock.withLock { storedLastError } }
    private var storedLastError: String?

    /// - Parameter device: the device behind this slot, or nil for an empty slot.
    public init(device: (any VirtioDevice)?, ram: GuestRAM, irq: any InterruptLine) {
        self.device = device
        self.ram = ram
        self.irq = irq
        queueCount = device?.queueMaxSizes.count ?? 0
        queues = Array(repeating: QueueRegs(), count: queueCount)
    }

    /// The device status the driver last wrote (plus DEVICE_NEEDS_RESET if the device set it).
    public var currentStatus: VirtioStatus { lock.withLock { status } }

    // MARK: - BusDevice

    /// A guest read of `size` bytes at register `offset` (virtio 1.2 §4.2.2); offsets from
    /// 0x100 read the device's config space. Unknown registers read 0.
    public func read(offset: UInt64, size: Int) -> UInt64 {
        if offset >= Self.configBase {
            guard let device else { return 0 }
            return device.readConfig(offset: Int(offset - Self.configBase), size: size)
        }
        guard size == 4, let reg = Reg(rawValue: offset) else { return 0 }
        return lock.withLock { () -> UInt64 in
            switch reg {
            case .magic: return UInt64(Self.magic)
            case .version: return 2
            case .deviceID: return UInt64(device?.deviceType.rawValue ?? 0)
            case .vendorID: return UInt64(Self.vendorID)
            case .deviceFeatures:
                guard let device, deviceFeaturesSel < 2 else { return 0 }
                return (device.deviceFeatures >> (32 * UInt64(deviceFeaturesSel))) & 0xffff_ffff
            case .queueNumMax:
                guard let q = selectedQueue else { return 0 }
                return UInt64(device!.queueMaxSizes[q])
            case .queueReady:
                guard let q = selectedQueue else { return 0 }
                return queues[q].ready ? 1 : 0
            case .interruptStatus: return UInt64(interruptStatus)
            case .status: return UInt64(status.rawValue)
            case .configGeneration: return UInt64(configGeneration)
            case .shmLenLow, .shmLenHigh: return 0xffff_ffff   // no shared memory regions
            case .queueDescLow, .queueDescHigh, .queueDriverLow, .queueDriverHigh, .queueDeviceLow, .queueDeviceHigh:
                guard let q = selectedQueue else { return 0 }
                let v: UInt64
                switch reg {
                case .queueDescLow, .queueDescHigh: v = queues[q].desc
                case .queueDriverLow, .queueDriverHigh: v = queues[q].driver
                default: v = queues[q].device
                }
                return offset & 4 == 0 ? v & 0xffff_ffff : v >> 32
            default: return 0
            }
        }
    }

    /// A guest write of `size` bytes of `value` at register `offset`: feature negotiation,
    /// queue setup, notifications, interrupt acknowledge and status (writing 0 resets the device).
    /// Unknown registers are ignored.
    public func write(offset: UInt64, size: Int, value: UInt64) {
        if offset >= Self.configBase {
            device?.writeConfig(offset: Int(offset - Self.configBase), size: size, value: value)
            return
        }
        guard size == 4, let reg = Reg(rawValue: offset), let device else { return }
        let v = UInt32(truncatingIfNeeded: value)
        switch reg {
        case .queueNotify:
            // Outside the lock: the device may complete requests (and signal) at once. The
            // index is checked against the immutable `queueCount`, not `queues`, which register
            // writes from other vCPUs may be changing.
            if lock.withLock({ status.contains(.driverOK) && !status.contains(.needsReset) }), Int(v) < queueCount {
                device.notify(queue: Int(v))
            }
            return
        case .status:
            if v == 0 { reset(); return }
            setStatus(VirtioStatus(rawValue: v))
            return
        default: break
        }
        lock.withLock {
            let canConfigure = !status.contains(.driverOK) && !status.contains(.failed)
            switch reg {
            case .deviceFeaturesSel: deviceFeaturesSel = v
            case .driverFeaturesSel: driverFeaturesSel = v
            case .driverFeatures:
                guard status.contains(.driver), !status.contains(.featuresOK), driverFeaturesSel < 2 else { return }
                let shift = 32 * UInt64(driverFeaturesSel)
                driverFeatures = driverFeatures & ~(0xffff_ffff << shift) | UInt64(v) << shift
            case .queueSel: queueSel = v
            case .queueNum:
                guard canConfigure, let q = selectedQueue else { return }
                queues[q].num = UInt16(truncatingIfNeeded: min(v, UInt32(device.queueMaxSizes[q])))
            case .queueReady:
                guard let q = selectedQueue else { return }
                queues[q].ready = v & 1 != 0
            case .interruptACK:
                interruptStatus &= ~v
                updateLine()
            case .queueDescLow, .queueDescHigh, .queueDriverLow, .queueDriverHigh, .queueDeviceLow, .queueDeviceHigh:
                guard canConfigure, let q = selectedQueue, !queues[q].ready else { return }
                func merge(_ old: UInt64) -> UInt64 {
                    offset & 4 == 0 ? old & ~0xffff_ffff | UInt64(v) : old & 0xffff_ffff | UInt64(v) << 32
                }
                switch reg {
                case .queueDescLow, .queueDescHigh: queues[q].desc = merge(queues[q].desc)
                case .queueDriverLow, .queueDriverHigh: queues[q].driver = merge(queues[q].driver)
                default: queues[q].device = merge(queues[q].device)
                }
            default: break
            }
        }
    }

    private var selectedQueue: Int? { Int(queueSel) < queues.count ? Int(queueSel) : nil }

    // MARK: - Status and reset

    private func setStatus(_ new: VirtioStatus) {
        guard let device else { return }
        var activate: (UInt64, [Virtqueue?])?
        var failure: String?
        lock.withLock {
            var s = new
            // FEATURES_OK only sticks when the driver accepted a subset of what we offer
            // and the modern interface (VERSION_1).
            if s.contains(.featuresOK) && !status.contains(.featuresOK) {
                if driverFeatures & ~device.deviceFeatures != 0 || driverFeatures & VirtioFeature.version1 == 0 {
                    s.remove(.featuresOK)
                }
            }
            if s.contains(.driverOK) && !status.contains(.driverOK) {
                var qs: [Virtqueue?] = []
                for q in queues {
                    guard q.ready else { qs.append(nil); continue }
                    do {
                        qs.append(try Virtqueue(ram: ram, size: q.num, desc: q.desc, avail: q.driver, used: q.device))
                    } catch {
                        failure = "\(error)"
                        qs.append(nil)
                    }
                }
                if failure == nil { activate = (driverFeatures, qs) }
            }
            status = VirtioStatus(rawValue: s.rawValue | (status.rawValue & VirtioStatus.needsReset.rawValue))
        }
        if let failure { deviceNeedsReset(failure) }
        if let (features, qs) = activate { device.activate(features: features, queues: qs, transport: self) }
    }

    private func reset() {
        device?.reset()   // waits for requests in flight; outside the lock (they signal)
        lock.withLock {
            deviceFeaturesSel = 0; driverFeaturesSel = 0; driverFeatures = 0; queueSel = 0
            for i in queues.indices { queues[i] = QueueRegs() }
            status = []
            interruptStatus = 0
            updateLine()
        }
    }

    private func updateLine() {
        let l = interruptStatus != 0
        if l != lineLevel {
            lineLevel = l
            irq.set(l)
        }
    }

    // MARK: - VirtioTransportCallbacks

    /// Called by the device when it put buffers in the used ring of `queue`: sets the
    /// used-buffer interrupt bit and raises the interrupt line.
    public func signalUsedBuffers(queue: Int) {
        lock.withLock {
            interruptStatus |= InterruptBit.usedBuffer
            updateLine()
        }
    }

    /// Called by the device on a fatal driver error (a malformed ring): sets
    /// DEVICE_NEEDS_RESET, raises a config-change interrupt and records `why` in ``lastError``.
    public func deviceNeedsReset(_ why: String) {
        lock.withLock {
            storedLastError = why
            status.insert(.needsReset)
            configGeneration &+= 1
            interruptStatus |= InterruptBit.configChange
            updateLine()
        }
    }
}
