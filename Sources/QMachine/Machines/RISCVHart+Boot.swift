/// The software hart is the machine's default CPU.
extension RISCVHart: RISCVBootCPU {}

extension RISCVCPUModel {
    /// QMachine's software RISC-V hart (interpreter with built-in SBI).
    public static let software = RISCVCPUModel(
        isa: RISCVHart.isaString, isaBase: RISCVHart.isaBase, isaExtensions: RISCVHart.isaExtensions,
        mmuType: RISCVHart.mmuType, timebaseFrequency: RISCVHart.timebaseFrequency
    ) { hartID, ram, bus, platform in
        RISCVHart(hartID: hartID, ram: ram, bus: bus, platform: platform)
    }
}
