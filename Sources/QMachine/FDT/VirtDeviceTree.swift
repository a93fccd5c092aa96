/// The device tree of the `riscv64-virt` machine, laid out like QEMU's `virt` board
/// (hw/riscv/virt.c) so that a stock distribution kernel finds its devices: /memory,
/// /cpus with one hart and its interrupt controller, /soc with the PLIC, the ns16550a UART
/// and the virtio-mmio slots, /chosen with the command line, console and initrd.
public struct VirtDeviceTree: Sendable {
    /// The `/cpus/cpu@0` properties.
    public struct CPU: Sendable {
        /// `riscv,isa` (for example `rv64imafdc_zicntr_zicsr_zifencei`).
        public var isa: String
        /// `riscv,isa-base` (`rv64i`), when the current binding is written.
        public var isaBase: String?
        /// `riscv,isa-extensions`, when the current binding is written.
        public var isaExtensions: [String]?
        /// `mmu-type` (`riscv,sv39`, ...).
        public var mmuType: String
        /// `/cpus/timebase-frequency` in Hz.
        public var timebaseFrequency: UInt64
        /// Describes the CPU node's properties.
        public init(isa: String, isaBase: String? = nil, isaExtensions: [String]? = nil, mmuType: String, timebaseFrequency: UInt64) {
            self.isa = isa; self.isaBase = isaBase; self.isaExtensions = isaExtensions
            self.mmuType = mmuType; self.timebaseFrequency = timebaseFrequency
        }
    }

    /// Guest-physical start of RAM (`/memory` `reg`).
    public var ramBase: UInt64
    /// RAM size in bytes.
    public var ramSize: UInt64
    /// The hart's properties.
    public var cpu: CPU
    /// Guest-physical address of the PLIC.
    public var plicBase: UInt64
    /// Size in bytes of the PLIC's register window.
    public var plicSize: UInt64
    /// `riscv,ndev`: the number of PLIC sources.
    public var plicSources: UInt32
    /// Guest-physical address of the UART.
    public var uartBase: UInt64
    /// The PLIC source of the UART's interrupt.
    public var uartIRQ: UInt32
    /// The UART's `clock-frequency` in Hz.
    public var uartClock: UInt32
    /// (base, size, irq) of each virtio-mmio slot, in slot order.
    public var virtioSlots: [(base: UInt64, size: UInt64, irq: UInt32)]
    /// The kernel command line (`/chosen/bootargs`).
    public var bootargs: String
    /// The initrd's guest-physical range (`linux,initrd-start`/`-end`), if any.
    public var initrd: (start: UInt64, end: UInt64)?

    /// Describes a `virt` device tree with these addresses, sizes and interrupts.
    public init(ramBase: UInt64, ramSize: UInt64, cpu: CPU, plicBase: UInt64, plicSize: UInt64, plicSources: UInt32,
                uartBase: UInt64, uartIRQ: UInt32, uartClock: UInt32,
                virtioSlots: [(base: UInt64, size: UInt64, irq: UInt32)], bootargs: String,
                initrd: (start: UInt64, end: UInt64)?) {
        self.ramBase = ramBase; self.ramSize = ramSize; self.cpu = cpu
        self.plicBase = plicBase; self.plicSize = plicSize; self.plicSources = plicSources
        self.uartBase = uartBase; self.uartIRQ = uartIRQ; self.uartClock = uartClock
        self.virtioSlots = virtioSlots; self.bootargs = bootargs; self.initrd = initrd
    }

    private static func hex(_ v: UInt64) -> String { String(v, radix: 16) }
    private static func reg(_ base: UInt64, _ size: UInt64) -> [UInt32] {
        [UInt32(base >> 32), UInt32(truncatingIfNeeded: base), UInt32(size >> 32), UInt32(truncatingIfNeeded: size)]
    }

    /// The UART node's path, for `/chosen/stdout-path`.
    public var uartPath: String { "/soc/serial@\(Self.hex(uartBase))" }

    /// The DTB.
    public func build() -> [UInt8] {
        var f = FDTBuilder()
        let intc = f.allocatePhandle()
        let plic = f.allocatePhandle()

        f.beginNode("")
        f.property("#address-cells", u32: 2)
        f.property("#size-cells", u32: 2)
        f.property("compatible", string: "riscv-virtio")
        f.property("model", string: "riscv-virtio,qemu")

        f.beginNode("chosen")
        f.property("bootargs", string: bootargs)
        f.property("stdout-path", string: uartPath)
        if let initrd {
            f.property("linux,initrd-start", u64: initrd.start)
            f.property("linux,initrd-end", u64: initrd.end)
        }
        f.endNode()

        f.beginNode("aliases")
        f.property("serial0", string: uartPath)
        f.endNode()

        f.beginNode("memory@\(Self.hex(ramBase))")
        f.property("device_type", string: "memory")
        f.property("reg", cells: Self.reg(ramBase, ramSize))
        f.endNode()

        f.beginNode("cpus")
        f.property("#address-cells", u32: 1)
        f.property("#size-cells", u32: 0)
        f.property("timebase-frequency", u32: UInt32(truncatingIfNeeded: cpu.timebaseFrequency))
        f.beginNode("cpu@0")
        f.property("device_type", string: "cpu")
        f.property("reg", u32: 0)
        f.property("status", string: "okay")
        f.property("compatible", string: "riscv")
        f.property("riscv,isa", string: cpu.isa)
        if let base = cpu.isaBase, let ext = cpu.isaExtensions {
            f.property("riscv,isa-base", string: base)
            f.property("riscv,isa-extensions", strings: ext)
        }
        f.property("mmu-type", string: cpu.mmuType)
        f.beginNode("interrupt-controller")
        f.property("#interrupt-cells", u32: 1)
        f.property("interrupt-controller")
        f.property("compatible", string: "riscv,cpu-intc")
        f.property("phandle", u32: intc)
        f.endNode()
        f.endNode()
        f.endNode()

        f.beginNode("soc")
        f.property("#address-cells", u32: 2)
        f.property("#size-cells", u32: 2)
        f.property("compatible", string: "simple-bus")
        f.property("ranges")

        f.beginNode("plic@\(Self.hex(plicBase))")
        f.property("#interrupt-cells", u32: 1)
        f.property("#address-cells", u32: 0)
        f.property("compatible", strings: ["sifive,plic-1.0.0", "riscv,plic0"])
        f.property("interrupt-controller")
        // Context 0: M-mode external interrupt (11); context 1: S-mode external interrupt (9).
        f.property("interrupts-extended", cells: [intc, 11, intc, 9])
        f.property("reg", cells: Self.reg(plicBase, plicSize))
        f.property("riscv,ndev", u32: plicSources)
        f.property("phandle", u32: plic)
        f.endNode()

        f.beginNode("serial@\(Self.hex(uartBase))")
        f.property("compatible", string: "ns16550a")
        f.property("reg", cells: Self.reg(uartBase, 0x100))
        f.property("clock-frequency", u32: uartClock)
        f.property("interrupts", u32: uartIRQ)
        f.property("interrupt-parent", u32: plic)
        f.endNode()

        for slot in virtioSlots {
            f.beginNode("virtio_mmio@\(Self.hex(slot.base))")
            f.property("compatible", string: "virtio,mmio")
            f.property("reg", cells: Self.reg(slot.base, slot.size))
            f.property("interrupts", u32: slot.irq)
            f.property("interrupt-parent", u32: plic)
            f.property("dma-coherent")
            f.endNode()
        }
        f.endNode() // soc
        f.endNode() // root
        return f.finish()
    }
}
