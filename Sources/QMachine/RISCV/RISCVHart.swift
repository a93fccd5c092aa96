#if canImport(Glibc)
import Glibc
#endif
import Synchronization

/// A software RISC-V hart (RV64IMAFDC, Zicsr, Zifencei, Zicntr; Sv39/Sv48) that runs a guest
/// in S and U mode, with a built-in SBI firmware answering `ecall` from S-mode (the role
/// OpenSBI plays on real hardware). It plays the role of QEMU's TCG for QMachine.
///
/// Layout of the implementation:
/// - `RISCVHart.swift` — the public API, the run loop, interrupts and WFI;
/// - `RISCVState.swift` — architectural state, CSR bit names, the decoded-instruction format;
/// - `RISCVDecode.swift` — 32- and 16-bit (C extension) decoders into ``DecodedInstruction``;
/// - `RISCVExecute.swift` — the interpreter loop over decoded instructions;
/// - `RISCVMemory.swift` — Sv39/Sv48 page walks, the TLB, loads, stores, the decoded-code cache;
/// - `RISCVCSR.swift` — CSR reads and writes, traps, `sret`;
/// - `RISCVFloat.swift` — the F and D extensions;
/// - `RISCVAtomic.swift` — the A extension;
/// - `RISCVSBI.swift` — the SBI firmware (SBI specification v2.0).
///
/// Design: an interpreter over instructions decoded once and cached per guest-physical RAM
/// page (8 bytes per 2-byte slot, filled lazily). The loop keeps a pointer to the current
/// slot: sequential instructions advance it and land on a `.pageEnd` sentinel past the
/// page's last slot, so only jumps and taken branches check the page bounds, and an empty
/// slot is just one more case of the dispatch switch. Stores by the hart to a page holding decoded
/// code empty it (such pages never get store TLB entries, so only the slow path checks);
/// devices report DMA with ``invalidateCode(physicalAddress:length:)``; so the cache is always
/// coherent and `fence.i` discards nothing. Loads and stores hit a direct-mapped TLB (256
/// sets per privilege/SUM bank and access kind) that maps a virtual page to host memory;
/// misses walk Sv39/Sv48 page tables, set A/D in hardware, and go to the ``Bus`` for devices.
/// Misaligned accesses are emulated. Interrupts, stop requests and DMA invalidations are
/// looked at between blocks of at most 4096 instructions, and after instructions that may
/// unmask an interrupt.
///
/// Known deviations: the hart has no ASID bits; `cycle` counts retired instructions; on hosts
/// other than x86-64 (no 80-bit format), RMM rounding in F/D arithmetic is done as RNE.
///
/// Threading: ``run()`` runs on one dedicated thread and owns all architectural state.
/// ``requestStop()``, ``invalidateCode(physicalAddress:length:)`` and the interrupt lines may
/// be called from any thread.
// @unchecked: the CPU state behind `st`, `x`, `f`, `tlb`, `straddle`, `code`, `exitReason` and
// `peeking` is confined to the thread running `run()`; cross-thread requests go through the Atomics
// (`stopFlag`, `attention`, `lines`), the Mutex `pendingInvalidations` and `sleepLock`/`sleepCond`; the
// wires are set in `init`.
public final class RISCVHart: VirtualCPU, @unchecked Sendable {
    /// The `riscv,isa` string of the device tree.
    public static let isaString = "rv64imafdc_zicntr_zicsr_zifencei"
    /// `riscv,isa-base` and `riscv,isa-extensions`, the newer device-tree form of the same.
    public static let isaBase = "rv64i"
    /// The ISA extensions this hart implements, as the device tree's `riscv,isa-extensions` lists them.
    public static let isaExtensions = ["i", "m", "a", "f", "d", "c", "zicntr", "zicsr", "zifencei"]
    /// The `mmu-type` of the device tree: the widest translation mode implemented (Sv39 is also accepted).
    public static let mmuType = "riscv,sv48"
    /// Frequency of the `time` CSR (host monotonic time).
    public static let timebaseFrequency: UInt64 = 10_000_000

    /// The hart's ID (`mhartid`; also its `reg` in the device tree).
    public let hartID: UInt64
    let ram: GuestRAM
    let bus: Bus
    let platform: any SBIPlatform

    // Hot state, reached through pointers so the interpreter loop pays no exclusivity checks.
    let st: UnsafeMutablePointer<HartState>
    let x: UnsafeMutablePointer<UInt64>
    let f: UnsafeMutablePointer<UInt64>
    let tlb: UnsafeMutablePointer<TLBEntry>
    /// Where F/D operations store their result before host FP flags are read (an ordering barrier).
    let fpSink: UnsafeMutableRawPointer
    let code: CodeCache
    /// Where an instruction that straddles two pages is decoded for one execution (it is
    /// not cached): slot 0, then `.pageEnd` slots, where its sequential successor lands.
    let straddle: UnsafeMutablePointer<DecodedInstruction>

    // Cross-thread state.
    let stopFlag = Atomic<Bool>(false)
    let attention = Atomic<Bool>(false)
    let lines = Atomic<UInt64>(0)
    let sleepLock: UnsafeMutablePointer<pthread_mutex_t>
    let sleepCond: UnsafeMutablePointer<pthread_cond_t>
    let pendingInvalidations = Mutex<[(UInt64, UInt64)]>([])

    /// Set by the interpreter to end ``run()``.
    var exitReason: VCPUExit?
    /// True while a crash report walks page tables (traps are suppressed).
    var peeking = false
    let bootNanoseconds: UInt64

    private var seiWire: HartInterruptWire!
    private var meiWire: HartInterruptWire!

    /// - Parameters:
    ///   - hartID: this hart's id (a0 at boot, SBI HSM).
    ///   - ram: guest RAM; the only memory code can run from.
    ///   - bus: device windows for loads and stores outside RAM.
    ///   - platform: console services for the SBI firmware.
    public init(hartID: UInt64 = 0, ram: GuestRAM, bus: Bus, platform: any SBIPlatform) {
        self.hartID = hartID
        self.ram = ram
        self.bus = bus
        self.platform = platform
        st = .allocate(capacity: 1)
        st.initialize(to: HartState())
        // x0...x31 and a sink (index 32) that instructions with rd = x0 write.
        x = .allocate(capacity: 33)
        x.initialize(repeating: 0, count: 33)
        f = .allocate(capacity: 32)
        f.initialize(repeating: 0, count: 32)
        tlb = .allocate(capacity: TLBEntry.total)
        tlb.initialize(repeating: TLBEntry(), count: TLBEntry.total)
        fpSink = .allocate(byteCount: 16, alignment: 16)
        code = CodeCache(ramBase: ram.base, ramSize: ram.size)
        straddle = .allocate(capacity: 3)
        straddle.initialize(to: DecodedInstruction())
        CodeCache.setSentinels(straddle + 1)
        sleepLock = .allocate(capacity: 1)
        pthread_mutex_init(sleepLock, nil)
        sleepCond = .allocate(capacity: 1)
        var attr = pthread_condattr_t()
        pthread_condattr_init(&attr)
        pthread_condattr_setclock(&attr, CLOCK_MONOTONIC)
        pthread_cond_init(sleepCond, &attr)
        pthread_condattr_destroy(&attr)
        bootNanoseconds = RISCVHart.monotonicNanoseconds()
        seiWire = HartInterruptWire(hart: self, bit: Interrupt.sei)
        meiWire = HartInterruptWire(hart: self, bit: Interrupt.mei)
    }

    deinit {
        st.deinitialize(count: 1); st.deallocate()
        x.deallocate(); f.deallocate(); tlb.deallocate(); fpSink.deallocate(); straddle.deallocate()
        pthread_cond_destroy(sleepCond); sleepCond.deallocate()
        pthread_mutex_destroy(sleepLock); sleepLock.deallocate()
    }

    // MARK: Registers

    /// The program counter; setting it (before ``run()`` or while stopped) also drops the
    /// cached fetch page.
    public var pc: UInt64 {
        get { st.pointee.pc }
        set { st.pointee.pc = newValue; st.pointee.fetchVBase = .max }
    }

    /// Sets integer register `index` (0...31; writes to x0 are ignored).
    public func setRegister(_ index: Int, _ value: UInt64) {
        precondition(index >= 0 && index < 32, "register index \(index)")
        if index != 0 { x[index] = value }
    }

    /// Integer register `index` (0...31).
    public func register(_ index: Int) -> UInt64 {
        precondition(index >= 0 && index < 32, "register index \(index)")
        return x[index]
    }

    /// Floating-point register `index` as raw bits (singles are NaN-boxed).
    public func floatRegister(_ index: Int) -> UInt64 { f[index & 31] }
    /// Sets floating-point register f`index` to the raw bits `bits` (NaN-boxed for singles
    /// by the caller); `index` is taken modulo 32. Only while the hart is not running.
    public func setFloatRegister(_ index: Int, _ bits: UInt64) { f[index & 31] = bits }

    /// Instructions retired since creation (the `instret` CSR).
    public var instructionsRetired: UInt64 { st.pointee.instret }

    /// Current privilege: 1 for S-mode, 0 for U-mode.
    public var privilege: UInt64 { st.pointee.priv }

    /// Reads a CSR as the guest would in S-mode (nil if it does not exist); for tests and debugging.
    public func readCSR(_ number: UInt32) -> UInt64? { csrRead(number) }

    // MARK: Interrupt wires

    /// The wire the PLIC drives for this hart's supervisor external interrupt (SEIP). Any thread.
    public var supervisorExternalInterrupt: any InterruptLine { seiWire }
    /// The machine-mode external interrupt context: recorded, but never delivered (the guest runs in S/U mode).
    public var machineExternalInterrupt: any InterruptLine { meiWire }

    func setLine(_ bit: UInt64, _ level: Bool) {
        pthread_mutex_lock(sleepLock)
        if level { lines.bitwiseOr(bit, ordering: .sequentiallyConsistent) } else { lines.bitwiseAnd(~bit, ordering: .sequentiallyConsistent) }
        pthread_cond_signal(sleepCond)
        pthread_mutex_unlock(sleepLock)
    }

    // MARK: Control from other threads

    /// Asks ``run()`` to return `.stopped` soon (from any thread); wakes a sleeping hart.
    public func requestStop() {
        pthread_mutex_lock(sleepLock)
        stopFlag.store(true, ordering: .sequentiallyConsistent)
        attention.store(true, ordering: .sequentiallyConsistent)
        pthread_cond_signal(sleepCond)
        pthread_mutex_unlock(sleepLock)
    }

    /// Drops decoded instructions for guest-physical `[physicalAddress, +length)`: devices call
    /// it after DMA into guest RAM (from any thread). Stores by the hart itself are tracked
    /// without it. Takes effect before the hart runs its next block.
    public func invalidateCode(physicalAddress: UInt64, length: UInt64) {
        guard length > 0 else { return }
        pendingInvalidations.withLock { $0.append((physicalAddress, length)) }
        attention.store(true, ordering: .sequentiallyConsistent)
    }

    // MARK: Time

    static func monotonicNanoseconds() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
    }

    /// The `time` CSR: 10 MHz ticks of host monotonic time since the hart was created.
    @inline(__always) func timeNow() -> UInt64 {
        (RISCVHart.monotonicNanoseconds() &- bootNanoseconds) / 100
    }

    // MARK: Run loop

    /// Runs the guest until it shuts down, resets, crashes or ``requestStop()`` is called.
    public func run() -> VCPUExit {
        while true {
            if attention.load(ordering: .relaxed) {
                attention.store(false, ordering: .sequentiallyConsistent)
                if stopFlag.load(ordering: .sequentiallyConsistent) {
                    stopFlag.store(false, ordering: .sequentiallyConsistent)
                    return .stopped
                }
                let ranges = pendingInvalidations.withLock { r -> [(UInt64, UInt64)] in let c = r; r.removeAll(); return c }
                for (a, n) in ranges { invalidatePhysical(a, n) }
            }
            if let e = exitReason { exitReason = nil; return e }
            if st.pointee.halted {
                waitUntilStopped()
                continue
            }
            if st.pointee.wfi {
                st.pointee.wfi = false
                waitForInterrupt()
                continue
            }
            checkInterrupts()
            if let e = exitReason { exitReason = nil; return e }
            executeBlock(budget: 4096)
        }
    }

    /// Interrupts pending now, as the `sip` bits (SSIP, STIP, SEIP).
    @inline(__always) func pendingInterrupts() -> UInt64 {
        var p = st.pointee.sipSoft | (lines.load(ordering: .relaxed) & Interrupt.sei)
        if st.pointee.stimecmp != .max && timeNow() >= st.pointee.stimecmp { p |= Interrupt.sti }
        return p
    }

    /// Takes the highest-priority pending, enabled interrupt (SEI > SSI > STI).
    func checkInterrupts() {
        guard st.pointee.priv == Priv.user || st.pointee.status & Status.sie != 0 else { return }
        let enabled = st.pointee.sie
        guard enabled != 0 else { return }
        var pending = (st.pointee.sipSoft | (lines.load(ordering: .relaxed) & Interrupt.sei)) & enabled
        if enabled & Interrupt.sti != 0 && st.pointee.stimecmp != .max && timeNow() >= st.pointee.stimecmp {
            pending |= Interrupt.sti
        }
        guard pending != 0 else { return }
        let cause: UInt64
        if pending & Interrupt.sei != 0 { cause = 9 } else if pending & Interrupt.ssi != 0 { cause = 1 } else { cause = 5 }
        trap(cause: cause | (1 << 63), tval: 0)
    }

    /// WFI: sleeps until an enabled interrupt is pending (whatever sstatus.SIE says), the
    /// timer deadline passes, or a stop is requested.
    func waitForInterrupt() {
        pthread_mutex_lock(sleepLock)
        defer { pthread_mutex_unlock(sleepLock) }
        while !attention.load(ordering: .sequentiallyConsistent) && pendingInterrupts() & st.pointee.sie == 0 {
            let deadline = st.pointee.stimecmp
            if st.pointee.sie & Interrupt.sti != 0 && deadline != .max {
                let ns = deadline > (UInt64.max - bootNanoseconds) / 100 ? UInt64.max / 2 : bootNanoseconds &+ deadline &* 100
                var ts = timespec(tv_sec: Int(ns / 1_000_000_000), tv_nsec: Int(ns % 1_000_000_000))
                pthread_cond_timedwait(sleepCond, sleepLock, &ts)
            } else {
                pthread_cond_wait(sleepCond, sleepLock)
            }
        }
    }

    /// SBI HSM hart_stop on the only hart: sleep until the machine stops us.
    func waitUntilStopped() {
        pthread_mutex_lock(sleepLock)
        while !attention.load(ordering: .sequentiallyConsistent) { pthread_cond_wait(sleepCond, sleepLock) }
        pthread_mutex_unlock(sleepLock)
    }
}

/// One interrupt input of a hart.
// @unchecked: no mutable state: `hart` and `bit` are immutable; raising the line only touches the
// hart's Atomics.
final class HartInterruptWire: InterruptLine, @unchecked Sendable {
    unowned let hart: RISCVHart
    let bit: UInt64
    init(hart: RISCVHart, bit: UInt64) { self.hart = hart; self.bit = bit }
    func set(_ level: Bool) { hart.setLine(bit, level) }
}
