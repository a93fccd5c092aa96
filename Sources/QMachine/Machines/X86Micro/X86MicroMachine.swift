import Foundation
import QBlock

/// The `x86_64-micro` machine, run by the KVM accelerator: RAM, a 16550 UART on the
/// legacy COM1 ports and virtio-mmio block devices, no interrupt controller, no BIOS.
///
/// ```
/// guest-physical                                  ports
/// 0x0000_0000  RAM (16 MiB by default)           0x3f8–0x3ff  16550 UART (COM1)
///   0x0000_1000  GDT, page tables (X86LongModeBoot)
///   0x0008_0000  stacks, 16 KiB per vCPU, growing down from 0x0010_0000
///   0x0010_0000  firmware: a flat binary, entered in 64-bit mode at its first byte
/// 0xd000_0000  virtio-mmio slot i at 0xd000_0000 + i*0x1000 (8 slots; empty ones read DeviceID 0)
/// ```
/// Boot protocol: every vCPU starts in long mode (``X86LongModeBoot``) at the firmware's
/// first byte with RDI = vCPU index, RSI = RAM size, RDX = number of vCPUs, RSP = its
/// stack, interrupts disabled. Devices raise no interrupts (there is nothing to deliver
/// them to): the firmware polls the UART's LSR and the virtqueues' used rings.
/// Power-off is `cli; hlt` (HLT with RFLAGS.IF clear): see ``KVMVCPU``.
///
/// The run ends when vCPU 0 ends (power-off, crash, stop) or any vCPU crashes; the other
/// vCPUs are then stopped. One thread per vCPU.
// @unchecked: no mutable stored state: every property is an immutable reference to a thread-safe
// device, bus, VM or vCPU.
public final class X86MicroMachine: @unchecked Sendable {
    /// The machine name (`-M x86_64-micro`): a KVM guest without BIOS, entered in long mode.
    public static let name = "x86_64-micro"
    /// Guest-physical address where the flat firmware binary is loaded and entered.
    public static let firmwareAddress: UInt64 = 0x10_0000
    /// The initial stack pointer (the stack grows down from the firmware's load address).
    public static let stackTop: UInt64 = 0x10_0000
    /// The size of vCPU 0's initial stack in bytes; each further vCPU's stack is below it.
    public static let stackSize: UInt64 = 0x4000
    /// The lowest address the vCPU stacks may reach; it bounds the number of vCPUs.
    public static let stackBottom: UInt64 = 0x8_0000
    /// The COM1 port base of the 16550 UART.
    public static let uartPort: UInt64 = 0x3f8
    /// The number of UART ports.
    public static let uartPorts: UInt64 = 8
    /// Guest-physical address of the first virtio-mmio slot (4 KiB apart, in the MMIO hole).
    public static let virtioBase: UInt64 = 0xd000_0000
    /// The number of virtio-mmio slots.
    public static let virtioSlots = 8
    /// Default guest RAM in bytes (16 MiB).
    public static let defaultMemorySize: UInt64 = 16 << 20
    /// RAM ends below the MMIO hole.
    public static let maximumMemorySize: UInt64 = 0xc000_0000

    /// A disk behind a virtio-blk device (the same description every machine takes).
    public typealias Drive = RISCVVirtMachine.Drive

    /// How to build the machine.
    public struct Configuration: Sendable {
        /// Guest RAM in bytes, at most ``maximumMemorySize``.
        public var memorySize: UInt64 = X86MicroMachine.defaultMemorySize
        /// The flat binary loaded at ``X86MicroMachine/firmwareAddress``.
        public var firmwarePath: String
        /// Disks, in slot order.
        public var drives: [Drive] = []
        /// Where the UART's output goes and its input comes from.
        public var serial: any SerialBackend
        /// The number of vCPUs (one thread each).
        public var cpus: Int = 1
        /// The KVM device node.
        public var kvmPath: String = KVMHypervisor.defaultPath

        /// A configuration with the defaults, running `firmwarePath` with `serial` as console.
        public init(firmwarePath: String, serial: any SerialBackend) {
            self.firmwarePath = firmwarePath
            self.serial = serial
        }
    }

    /// The configuration the machine was built from.
    public let configuration: Configuration
    /// The guest's RAM, from address 0.
    public let ram: GuestRAM
    /// x86 port I/O space.
    public let ports = Bus()
    /// MMIO space.
    public let mmio = Bus()
    /// The console UART at ``uartPort``.
    public let uart: UART16550
    /// The virtio-mmio slots, empty ones included.
    public let virtio: [VirtioMMIO]
    /// The virtio-blk devices, one per drive, in slot order.
    public let blocks: [VirtioBlock]
    /// The KVM virtual machine.
    public let vm: KVMVirtualMachine
    /// The vCPUs, vCPU 0 first.
    public let vcpus: [KVMVCPU]

    /// Builds the machine: opens KVM, maps RAM, loads the firmware, creates the vCPUs.
    /// - Throws: ``MachineError`` `.unsupported` when KVM is absent or refuses,
    ///   `.badImage` for a missing, empty or too large firmware, `.invalidArgument` for
    ///   bad sizes or too many drives or vCPUs.
    public init(_ config: Configuration) throws {
        guard config.drives.count <= Self.virtioSlots else {
            throw MachineError(.invalidArgument, "at most \(Self.virtioSlots) drives (got \(config.drives.count))", operation: "build machine")
        }
        let maxCPUs = Int((Self.stackTop - Self.stackBottom) / Self.stackSize)
        guard config.cpus >= 1, config.cpus <= maxCPUs else {
            throw MachineError(.invalidArgument, "\(config.cpus) vCPUs: between 1 and \(maxCPUs)", operation: "build machine")
        }
        guard config.memorySize >= 2 << 20, config.memorySize <= Self.maximumMemorySize else {
            throw MachineError(.invalidArgument, "memory size \(config.memorySize) must be between 2 MiB and 3 GiB", operation: "build machine")
        }
        let firmware = try BootFiles.read(config.firmwarePath, what: "firmware")
        guard !firmware.isEmpty else {
            throw MachineError(.badImage, "firmware '\(config.firmwarePath)' is empty", operation: "load firmware")
        }
        guard UInt64(firmware.count) <= config.memorySize - Self.firmwareAddress else {
            throw MachineError(.badImage, "firmware '\(config.firmwarePath)' (\(firmware.count) bytes) does not fit in RAM above 0x\(String(Self.firmwareAddress, radix: 16))",
                               operation: "load firmware")
        }

        let kvm = try KVMHypervisor(path: config.kvmPath)
        configuration = config
        let ram = try GuestRAM(base: 0, size: config.memorySize)
        self.ram = ram
        let noIRQ = NoInterruptLine()
        uart = UART16550(backend: config.serial, irq: noIRQ)
        var slots: [VirtioMMIO] = []
        var blocks: [VirtioBlock] = []
        for i in 0..<Self.virtioSlots {
            var dev: VirtioBlock?
            if i < config.drives.count {
                let d = config.drives[i]
                let b = VirtioBlock(node: d.node, serial: d.id, readOnly: d.readOnly)
                blocks.append(b)
                dev = b
            }
            slots.append(VirtioMMIO(device: dev, ram: ram, irq: noIRQ))
        }
        virtio = slots
        self.blocks = blocks
        try ports.map(base: Self.uartPort, size: Self.uartPorts, device: uart)
        for (i, s) in slots.enumerated() {
            try mmio.map(base: Self.virtioBase + UInt64(i) * VirtioMMIO.windowSize, size: VirtioMMIO.windowSize, device: s)
        }

        try X86LongModeBoot.writeTables(into: ram)
        // SAFETY: `firmware` is alive for the closure; `ram.write` checks the destination range.
        try firmware.withUnsafeBytes { try ram.write($0, at: Self.firmwareAddress) }

        let vm = try kvm.createVirtualMachine()
        self.vm = vm
        try vm.map(ram)
        var cpus: [KVMVCPU] = []
        for i in 0..<config.cpus {
            let cpu = try vm.createVCPU(id: i, ports: ports, mmio: mmio)
            try X86LongModeBoot.start(cpu, entry: Self.firmwareAddress,
                                      stack: Self.stackTop - UInt64(i) * Self.stackSize,
                                      arguments: (UInt64(i), config.memorySize, UInt64(config.cpus)))
            cpus.append(cpu)
        }
        vcpus = cpus
        uart.connectInput()
    }

    // MARK: - Running

    /// Runs the vCPUs, one thread each, until the run ends (see the type's description).
    public func run() async -> VCPUExit { await run(timeout: nil) }

    /// ``run()``, stopping the vCPUs after `timeout` seconds (nil: no limit); the result
    /// is then `.stopped`.
    public func run(timeout: Double?) async -> VCPUExit {
        await withCheckedContinuation { (k: CheckedContinuation<VCPUExit, Never>) in
            let t = Thread { k.resume(returning: self.runBlocking(timeout: timeout)) }
            t.name = "x86-micro-run"
            t.start()
        }
    }

    /// ``run(timeout:)`` for callers without async: blocks the calling thread.
    public func runBlocking(timeout: Double? = nil) -> VCPUExit {
        let state = RunState(count: vcpus.count)
        for (i, cpu) in vcpus.enumerated() {
            let t = Thread { [self] in
                let exit = cpu.run()
                if state.finish(i, exit) { stop() }
            }
            t.name = "vcpu\(i)"
            t.stackSize = 1 << 20
            t.start()
        }
        if !state.waitForEnd(timeout: timeout) { stop() }
        return state.waitForAll()
    }

    /// Asks every vCPU to stop (they return `.stopped`).
    public func stop() { for c in vcpus { c.requestStop() } }

    /// Quiesces the disks after the vCPUs stopped: resets the virtio devices (waiting for
    /// requests in flight) and flushes every writable drive. The caller closes the nodes.
    public func quiesce() async throws {
        for s in virtio { s.write(offset: VirtioMMIO.Reg.status.rawValue, size: 4, value: 0) }
        var firstError: (any Error)?
        for d in configuration.drives where !d.readOnly {
            do { try await d.node.flush() } catch { if firstError == nil { firstError = error } }
        }
        if let firstError { throw firstError }
    }
}

/// The run's bookkeeping: which vCPU exits decided the result, and who has finished.
// @unchecked: `exits` and `decisive` are only touched with `lock` held.
private final class RunState: @unchecked Sendable {
    private let lock = DeviceLock()
    private var exits: [VCPUExit?]
    private var decisive: VCPUExit?

    init(count: Int) { exits = Array(repeating: nil, count: count) }

    /// Records vCPU `index`'s exit; true when it ends the run (the others must stop).
    func finish(_ index: Int, _ exit: VCPUExit) -> Bool {
        lock.withLock {
            exits[index] = exit
            defer { lock.broadcast() }
            guard decisive == nil else { return false }
            var ends = index == 0
            switch exit {
            case .crashed, .reset: ends = true
            default: break
            }
            if ends { decisive = exit }
            return ends
        }
    }

    /// Waits until the run's result is known; false on timeout.
    func waitForEnd(timeout: Double?) -> Bool {
        lock.withLock {
            guard let timeout else {
                while decisive == nil && exits.contains(where: { $0 == nil }) { lock.wait() }
                return true
            }
            let deadline = DispatchTime.now().uptimeNanoseconds + UInt64(max(0, timeout) * 1e9)
            while decisive == nil && exits.contains(where: { $0 == nil }) {
                let now = DispatchTime.now().uptimeNanoseconds
                if now >= deadline { return false }
                _ = lock.wait(seconds: Double(deadline - now) / 1e9)
            }
            return true
        }
    }

    /// Waits for every vCPU thread; returns the run's result.
    func waitForAll() -> VCPUExit {
        lock.withLock {
            while exits.contains(where: { $0 == nil }) { lock.wait() }
            return decisive ?? exits[0] ?? .stopped
        }
    }
}

/// An interrupt wire connected to nothing: x86_64-micro's guests poll.
// @unchecked: no stored state at all.
final class NoInterruptLine: InterruptLine, @unchecked Sendable {
    func set(_ level: Bool) {}
}
