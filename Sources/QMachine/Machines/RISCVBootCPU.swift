/// What the `riscv64-virt` machine needs from a RISC-V CPU: the boot registers, the
/// external interrupt inputs the PLIC drives, code invalidation after DMA, and the
/// properties the device tree advertises. The software hart (`RISCVHart`) conforms; so can
/// a KVM vCPU later, and the tests use a fake.
public protocol RISCVBootCPU: VirtualCPU {
    var pc: UInt64 { get set }
    /// Sets integer register x`index` (boot: a0 = x10 = hart id, a1 = x11 = DTB address).
    func setRegister(_ index: Int, _ value: UInt64)
    /// The S-mode external interrupt input (PLIC context 1).
    var supervisorExternalInterrupt: any InterruptLine { get }
    /// The M-mode external interrupt input (PLIC context 0).
    var machineExternalInterrupt: any InterruptLine { get }
    /// Drops translated or decoded code for a guest-physical range a device just wrote.
    func invalidateCode(physicalAddress: UInt64, length: UInt64)
    var instructionsRetired: UInt64 { get }
}

/// A kind of RISC-V CPU: what the device tree says about it and how to make one.
public struct RISCVCPUModel: Sendable {
    /// `riscv,isa` (deprecated by the binding, still read by every kernel).
    public var isa: String
    /// `riscv,isa-base` and `riscv,isa-extensions` (the current binding), when known.
    public var isaBase: String?
    /// The extensions for `riscv,isa-extensions`, or `nil` to write only `riscv,isa`.
    public var isaExtensions: [String]?
    /// `mmu-type` in the device tree (`riscv,sv39`, `riscv,sv48`, ...).
    public var mmuType: String
    /// `timebase-frequency` in Hz: how fast `time` advances.
    public var timebaseFrequency: UInt64
    /// Makes the CPU for hart `hartID` over `ram` and `bus`, with SBI calls going to `platform`.
    public var make: @Sendable (_ hartID: UInt64, _ ram: GuestRAM, _ bus: Bus, _ platform: any SBIPlatform) -> any RISCVBootCPU

    /// Describes a CPU kind by its device tree properties and a factory `make`.
    public init(isa: String, isaBase: String? = nil, isaExtensions: [String]? = nil, mmuType: String, timebaseFrequency: UInt64,
                make: @escaping @Sendable (UInt64, GuestRAM, Bus, any SBIPlatform) -> any RISCVBootCPU) {
        self.isa = isa
        self.isaBase = isaBase
        self.isaExtensions = isaExtensions
        self.mmuType = mmuType
        self.timebaseFrequency = timebaseFrequency
        self.make = make
    }
}
