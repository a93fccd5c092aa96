/// A level-triggered interrupt wire from an interrupt controller (PLIC) to a CPU input
/// (a hart's supervisor external interrupt), or from a device to the controller.
/// `set` may be called from any thread; the receiver must be wake-safe (a hart sleeping
/// in WFI wakes when its line goes high).
public protocol InterruptLine: AnyObject, Sendable {
    func set(_ level: Bool)
}

/// How a virtual CPU's run loop ended.
public enum VCPUExit: Sendable, Equatable {
    /// The guest asked to power off (SBI SRST shutdown, ACPI/port write on x86).
    case shutdown
    /// The guest asked for a reboot (SBI SRST cold/warm reboot).
    case reset
    /// ``VirtualCPU/requestStop()`` was called (QMP `stop`, or the machine tearing down).
    case stopped
    /// The guest crashed or executed something unsupported; the message names the PC and
    /// instruction word where it applies.
    case crashed(String)
}

/// The platform services a software RISC-V hart's built-in SBI firmware calls out to.
public protocol SBIPlatform: AnyObject, Sendable {
    /// DBCN / legacy console_putchar: bytes the guest writes to the firmware console.
    func consoleWrite(_ bytes: UnsafeRawBufferPointer)
    /// Legacy console_getchar: the next input byte, or nil if none is waiting.
    func consoleRead() -> UInt8?
}
