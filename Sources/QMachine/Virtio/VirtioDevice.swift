/// Virtio device types (Virtio 1.2, section 5 "Device Types").
public enum VirtioDeviceType: UInt32, Sendable {
    case none = 0, net = 1, block = 2, console = 3, entropy = 4
}

/// Feature bits shared by all devices (Virtio 1.2, section 6 "Reserved Feature Bits").
public enum VirtioFeature {
    /// VIRTIO_F_INDIRECT_DESC (bit 28): descriptors may point to indirect tables (virtio 1.2 §2.7.5.3).
    public static let ringIndirectDesc: UInt64 = 1 << 28
    /// VIRTIO_F_EVENT_IDX (bit 29): used/avail event indexes suppress notifications (§2.7.10).
    public static let ringEventIdx: UInt64 = 1 << 29
    /// VIRTIO_F_VERSION_1 (bit 32): a modern (non-legacy) device; required by this transport.
    public static let version1: UInt64 = 1 << 32
}

/// Device status bits (Virtio 1.2, 2.1 "Device Status Field").
public struct VirtioStatus: OptionSet, Sendable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let acknowledge = VirtioStatus(rawValue: 1)
    public static let driver = VirtioStatus(rawValue: 2)
    public static let driverOK = VirtioStatus(rawValue: 4)
    public static let featuresOK = VirtioStatus(rawValue: 8)
    public static let needsReset = VirtioStatus(rawValue: 64)
    public static let failed = VirtioStatus(rawValue: 128)
}

/// What a device gets from its transport: raising the used-buffer interrupt and
/// reporting that it needs a reset. Independent of virtio-mmio or PCI (Firecracker's split).
public protocol VirtioTransportCallbacks: AnyObject, Sendable {
    /// Signals that queue `queue` has new used buffers (honouring nothing else: the
    /// device checks the driver's suppression flags itself).
    func signalUsedBuffers(queue: Int)
    /// The device found the driver's data structures broken: set DEVICE_NEEDS_RESET and
    /// raise a configuration-change interrupt.
    func deviceNeedsReset(_ why: String)
}

/// A virtio device model, independent of its transport.
public protocol VirtioDevice: AnyObject, Sendable {
    var deviceType: VirtioDeviceType { get }
    /// Features offered (VIRTIO_F_VERSION_1 included).
    var deviceFeatures: UInt64 { get }
    /// Number of virtqueues and the largest size of each.
    var queueMaxSizes: [UInt16] { get }
    /// Reads `size` bytes of the device-specific configuration space at `offset`.
    func readConfig(offset: Int, size: Int) -> UInt64
    func writeConfig(offset: Int, size: Int, value: UInt64)
    /// The driver set DRIVER_OK: the device starts serving these queues (nil: not enabled).
    func activate(features: UInt64, queues: [Virtqueue?], transport: any VirtioTransportCallbacks)
    /// The driver notified queue `queue`.
    func notify(queue: Int)
    /// The driver reset the device: stop using the queues. Returns once no request is in
    /// flight any more (no DMA into guest RAM after it returns).
    func reset()
}
