import Foundation
import QBlock

/// The `riscv64-virt` machine, laid out like QEMU's `virt` board:
///
/// ```
/// 0x0c00_0000  PLIC (96 sources, contexts 0 = hart 0 M-mode, 1 = hart 0 S-mode)
/// 0x1000_0000  ns16550a UART, IRQ 10
/// 0x1000_1000  virtio-mmio slot i at 0x1000_1000 + i*0x1000, IRQ 1+i (8 slots)
/// 0x8000_0000  RAM
/// ```
/// One hart, run on a dedicated thread. Firmware (SBI) is built into the CPU model, so
/// the kernel is entered directly in S-mode: a0 = hart id, a1 = DTB address, pc = kernel.
// @unchecked: `layout`, `deviceTree` and `cpu` are set while the machine is built, before it is shared;
// `running` is only touched with `lock` held; the devices are thread-safe themselves.
public final class RISCVVirtMachine: SBIPlatform, @unchecked Sendable {
    /// The machine name (`-M riscv64-virt`), modelled on QEMU's `virt`.
    public static let name = "riscv64-virt"
    /// Guest-physical address where RAM starts (as QEMU's `virt`).
    public static let ramBase: UInt64 = 0x8000_0000
    /// Guest-physical address of the PLIC.
    public static let plicBase: UInt64 = 0x0c00_0000
    /// Guest-physical address of the 16550 UART.
    public static let uartBase: UInt64 = 0x1000_0000
    /// The PLIC source the UART's interrupt is wired to.
    public static let uartIRQ = 10
    /// The UART's input clock in Hz, as the device tree reports it.
    public static let uartClock: UInt32 = 3_686_400
    /// Guest-physical address of the first virtio-mmio slot; slots are 4 KiB apart.
    public static let virtioBase: UInt64 = 0x1000_1000
    /// The number of virtio-mmio slots (PLIC sources 1...8).
    public static let virtioSlots = 8
    /// The number of PLIC interrupt sources.
    public static let plicSources = 96

    /// How to build the machine.
    public struct Configuration: Sendable {
        /// Guest RAM in bytes (default 512 MiB).
        public var memorySize: UInt64 = 512 << 20
        /// The Linux kernel `Image` to boot.
        public var kernelPath: String
        /// An initramfs to load after the kernel, if any.
        public var initrdPath: String?
        /// The kernel command line (`/chosen/bootargs`).
        public var bootargs: String = ""
        /// Disks, in slot order (the first is /dev/vda).
        public var drives: [Drive] = []
        /// Where the UART's output goes and its input comes from.
        public var serial: any SerialBackend

        /// A configuration with the defaults, booting `kernelPath` with `serial` as console.
        public init(kernelPath: String, serial: any SerialBackend) {
            self.kernelPath = kernelPath
            self.serial = serial
        }
    }

    /// A disk attached to a virtio-blk device.
    public struct Drive: Sendable {
        /// The block node the disk reads and writes.
        public var node: any BlockDriver
        /// The drive's ID (its QMP block backend name).
        public var id: String
        /// Whether the guest sees a read-only disk.
        public var readOnly: Bool
        /// Creates a drive over `node` named `id`.
        public init(node: any BlockDriver, id: String, readOnly: Bool = false) {
            self.node = node; self.id = id; self.readOnly = readOnly
        }
    }

    /// The configuration the machine was built from.
    public let configuration: Configuration
    /// The guest's RAM, at ``ramBase``.
    public let ram: GuestRAM
    /// The MMIO bus every device is mapped on.
    public let bus = Bus()
    /// The platform interrupt controller.
    public let plic: PLIC
    /// The console UART.
    public let uart: UART16550
    /// The virtio-mmio slots, empty ones included.
    public let virtio: [VirtioMMIO]
    /// The virtio-blk devices, one per drive, in slot order.
    public let blocks: [VirtioBlock]
    /// Where the kernel, initrd and device tree were placed; set while the machine is built.
    public private(set) var layout: LinuxBootLayout!
    /// The flattened device tree given to the kernel.
    public private(set) var deviceTree: [UInt8] = []
    /// The boot hart; set while the machine is built.
    public private(set) var cpu: (any RISCVBootCPU)!

    private let lock = DeviceLock()
    private var running = false
    /// Parks the hart's thread for QMP `stop` and lets it go on `cont` (RISCVVirt+Control.swift).
    let gate = VCPUGate()

    /// Builds the machine and loads the kernel, initrd and device tree into RAM.
    /// - Throws: ``MachineError`` `.badImage` for a missing or invalid kernel or initrd,
    ///   `.invalidArgument` for too many drives or bad sizes, `.outOfMemory`.
    public init(_ config: Configuration, cpu model: RISCVCPUModel) throws {
        guard config.drives.count <= Self.virtioSlots else {
            throw MachineError(.invalidArgument, "at most \(Self.virtioSlots) drives (got \(config.drives.count))", operation: "build machine")
        }
        // Read and check the boot files before allocating anything.
        let kernel = try BootFiles.read(config.kernelPath, what: "kernel")
        let header = try LinuxImageHeader(kernel, name: "kernel '\(config.kernelPath)'")
        guard !header.isBigEndian else {
            throw MachineError(.badImage, "kernel '\(config.kernelPath)' is big-endian", operation: "load kernel")
        }
        var initrd: [UInt8]?
        if let p = config.initrdPath {
            let b = try BootFiles.read(p, what: "initrd")
            _ = try InitrdFormat.detect(b, name: p)
            initrd = b
        }

        configuration = config
        ram = try GuestRAM(base: Self.ramBase, size: config.memorySize)
        plic = PLIC(sources: Self.plicSources, contexts: 2)
        uart = UART16550(backend: config.serial, irq: plic.source(Self.uartIRQ))
        var slots: [VirtioMMIO] = []
        var blocks: [VirtioBlock] = []
        for i in 0..<Self.virtioSlots {
            var dev: VirtioBlock?
            if i < config.drives.count {
                let d = config.drives[i]
                dev = VirtioBlock(node: d.node, serial: d.id, readOnly: d.readOnly)
                blocks.append(dev!)
            }
            slots.append(VirtioMMIO(device: dev, ram: ram, irq: plic.source(1 + i)))
        }
        virtio = slots
        self.blocks = blocks

        try bus.map(base: Self.plicBase, size: plic.windowSize, device: plic)
        try bus.map(base: Self.uartBase, size: UART16550.windowSize, device: uart)
        for (i, s) in slots.enumerated() {
            try bus.map(base: Self.virtioBase + UInt64(i) * VirtioMMIO.windowSize, size: VirtioMMIO.windowSize, device: s)
        }

        // The device tree's size does not depend on the initrd addresses (fixed-size
        // cells), so build it once with placeholders to place it, then for real.
        func tree(_ initrdRange: (UInt64, UInt64)?) -> [UInt8] {
            VirtDeviceTree(
                ramBase: Self.ramBase, ramSize: config.memorySize,
                cpu: .init(isa: model.isa, isaBase: model.isaBase, isaExtensions: model.isaExtensions,
                           mmuType: model.mmuType, timebaseFrequency: model.timebaseFrequency),
                plicBase: Self.plicBase, plicSize: plic.windowSize, plicSources: UInt32(Self.plicSources - 1),
                uartBase: Self.uartBase, uartIRQ: UInt32(Self.uartIRQ), uartClock: Self.uartClock,
                virtioSlots: (0..<Self.virtioSlots).map {
                    (Self.virtioBase + UInt64($0) * VirtioMMIO.windowSize, VirtioMMIO.windowSize, UInt32(1 + $0))
                },
                bootargs: config.bootargs, initrd: initrdRange.map { (start: $0.0, end: $0.1) }).build()
        }
        let sizing = tree(initrd == nil ? nil : (0, 0))
        let layout = try LinuxBootLayout(ramBase: Self.ramBase, ramSize: config.memorySize, kernelFileSize: UInt64(kernel.count),
                                         header: header, initrdSize: initrd.map { UInt64($0.count) }, fdtSize: UInt64(sizing.count))
        let dtb = tree(layout.initrdStart.map { ($0, layout.initrdEnd!) })
        precondition(dtb.count == sizing.count)
        self.layout = layout
        deviceTree = dtb

        // SAFETY: each source array is alive for its closure; `ram.write` checks the destination range.
        try kernel.withUnsafeBytes { try ram.write($0, at: layout.kernelAddress) }
        if let initrd, let start = layout.initrdStart { try initrd.withUnsafeBytes { try ram.write($0, at: start) } }
        try dtb.withUnsafeBytes { try ram.write($0, at: layout.fdtAddress) }

        // The CPU last: it gets this machine as its SBI platform.
        let hart = model.make(0, ram, bus, self)
        hart.pc = layout.kernelAddress
        hart.setRegister(10, 0)                    // a0: hart id
        hart.setRegister(11, layout.fdtAddress)    // a1: device tree
        plic.connect(context: 0, to: hart.machineExternalInterrupt)
        plic.connect(context: 1, to: hart.supervisorExternalInterrupt)
        for b in blocks {
            b.guestMemoryWritten = { [weak hart] address, length in
                hart?.invalidateCode(physicalAddress: address, length: length)
            }
        }
        cpu = hart
        uart.connectInput()
    }

    // MARK: - Running

    /// Runs the hart on a dedicated thread until the guest powers off, asks for a reset,
    /// crashes, or ``stop()`` is called. Returns how it ended.
    public func run() async -> VCPUExit {
        await withCheckedContinuation { (k: CheckedContinuation<VCPUExit, Never>) in
            startThread { k.resume(returning: $0) }
        }
    }

    /// ``run()`` for callers without async: blocks the calling thread.
    public func runBlocking() -> VCPUExit {
        // @unchecked: `exit` is only touched with `lock` held.
        final class Box: @unchecked Sendable { let lock = DeviceLock(); var exit: VCPUExit? }
        let box = Box()
        startThread { e in box.lock.withLock { box.exit = e; box.lock.broadcast() } }
        return box.lock.withLock { while box.exit == nil { box.lock.wait() }; return box.exit! }
    }

    private func startThread(_ finished: @escaping @Sendable (VCPUExit) -> Void) {
        let cpu = self.cpu!
        lock.withLock { running = true }
        let t = Thread { [self] in
            let exit = gate.run(cpu)
            lock.withLock { running = false }
            finished(exit)
        }
        t.name = "vcpu0"
        t.stackSize = 16 << 20
        t.start()
    }

    /// Asks the hart to stop for good: ``run()`` returns `.stopped` (a paused hart too).
    public func stop() { gate.quit(cpu) }

    /// Quiesces the disks after the hart stopped: resets the virtio devices (waiting for
    /// requests in flight) and flushes every drive. The caller closes the nodes it opened.
    public func quiesce() async throws {
        // A reset blocks until the device's request tasks finish; those run on the
        // cooperative pool, so the blocking wait must not occupy one of its threads.
        let slots = virtio
        await withCheckedContinuation { (k: CheckedContinuation<Void, Never>) in
            let t = Thread {
                for s in slots { s.write(offset: VirtioMMIO.Reg.status.rawValue, size: 4, value: 0) }
                k.resume()
            }
            t.name = "virtio-reset"
            t.start()
        }
        var firstError: (any Error)?
        for d in configuration.drives where !d.readOnly {
            do { try await d.node.flush() } catch { if firstError == nil { firstError = error } }
        }
        if let firstError { throw firstError }
    }

    // MARK: - SBIPlatform

    /// SBI console output: the bytes go out through the UART's backend.
    public func consoleWrite(_ bytes: UnsafeRawBufferPointer) { uart.transmit(bytes) }
    /// SBI console input: the next byte received by the UART, or `nil`.
    public func consoleRead() -> UInt8? { uart.takeInputByte() }
}
