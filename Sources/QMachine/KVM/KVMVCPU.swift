import CKVM
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// One KVM vCPU and its run loop (cloud-hypervisor's `Vcpu::run`): `KVM_RUN` until an
/// exit user space must handle, then
///
/// | Exit | Handling |
/// | --- | --- |
/// | `KVM_EXIT_IO` | port I/O on the port ``Bus`` (`rep ins/outs` included); unmapped ports read all-ones, writes are dropped |
/// | `KVM_EXIT_MMIO` | the MMIO ``Bus``; unmapped addresses read 0, writes are dropped |
/// | `KVM_EXIT_HLT` | with RFLAGS.IF clear: power-off, ``VCPUExit/shutdown`` (the machine has no interrupt source that could wake it); with IF set: waits for ``requestStop()`` |
/// | `KVM_EXIT_SHUTDOWN` | triple fault: ``VCPUExit/crashed(_:)`` naming RIP |
/// | `KVM_EXIT_FAIL_ENTRY`, `KVM_EXIT_INTERNAL_ERROR` | ``VCPUExit/crashed(_:)`` with KVM's reason and RIP |
/// | `KVM_EXIT_SYSTEM_EVENT` | shutdown, reset or crash as KVM reports it |
///
/// ``run()`` blocks its (dedicated) thread. ``requestStop()`` sets `immediate_exit` and
/// sends the thread a signal (``kickSignal``) so a `KVM_RUN` in progress returns `EINTR`.
// @unchecked: `stopRequested` and `runningThread` are only touched with `lock` held; the `runPage`
// mapping is only read and written by the thread in `run()`, except its `immediate_exit` byte, which
// `requestStop` may set from another thread (ckvm stores it atomically); the counters are Atomics.
public final class KVMVCPU: VirtualCPU, @unchecked Sendable {
    /// The vCPU index given to `KVM_CREATE_VCPU`.
    public let id: Int
    let vm: KVMVirtualMachine
    let fd: Int32
    private let runPage: UnsafeMutablePointer<kvm_run>
    private let runSize: Int
    private let ports: Bus
    private let mmio: Bus

    private let lock = DeviceLock()
    /// Set by requestStop; read by the run loop between KVM_RUN calls (under `lock`).
    private var stopRequested = false
    /// The thread inside run(), for kicking; nil when none is.
    private var runningThread: UInt64?

    // The counters are written by the vCPU thread and may be read by any thread while it
    // runs (a monitor, a test): Atomics, so a reader sees some recent value and never a torn
    // one. Relaxed ordering is enough, they publish nothing else.
    private let unhandled = Atomic<Int>(0)
    private let exits = Atomic<Int>(0)
    /// Accesses that hit nothing on the buses (diagnostics). Any thread.
    public var unhandledAccesses: Int { unhandled.load(ordering: .relaxed) }
    /// How many exits to user space the last ``run()`` took (diagnostics). Any thread.
    public var exitCount: Int { exits.load(ordering: .relaxed) }

    /// The signal that kicks a vCPU thread out of `KVM_RUN`.
    public static let kickSignal: Int32 = ckvm_kick_signal()
    private static let kickHandlerInstalled: Bool = ckvm_install_kick_handler(kickSignal) == 0

    init(vm: KVMVirtualMachine, id: Int, fd: Int32, run: UnsafeMutablePointer<kvm_run>, runSize: Int, ports: Bus, mmio: Bus) {
        self.vm = vm
        self.id = id
        self.fd = fd
        runPage = run
        self.runSize = runSize
        self.ports = ports
        self.mmio = mmio
    }

    deinit {
        ckvm_unmap_run(runPage, runSize)
        ckvm_close(fd)
    }

    // MARK: - Registers (used by machine loaders)

    /// The general-purpose registers, RIP and RFLAGS.
    func registers() throws -> kvm_regs {
        var r = kvm_regs()
        let rc = ckvm_get_regs(fd, &r)
        guard rc >= 0 else { throw MachineError(.io, "KVM_GET_REGS failed: \(Errno.text(-rc))", operation: "read vCPU registers") }
        return r
    }

    func setRegisters(_ r: kvm_regs) throws {
        var r = r
        let rc = ckvm_set_regs(fd, &r)
        guard rc >= 0 else { throw MachineError(.invalidArgument, "KVM_SET_REGS failed: \(Errno.text(-rc))", operation: "set vCPU registers") }
    }

    /// Segment, control and descriptor-table registers, EFER.
    func specialRegisters() throws -> kvm_sregs {
        var s = kvm_sregs()
        let rc = ckvm_get_sregs(fd, &s)
        guard rc >= 0 else { throw MachineError(.io, "KVM_GET_SREGS failed: \(Errno.text(-rc))", operation: "read vCPU registers") }
        return s
    }

    func setSpecialRegisters(_ s: kvm_sregs) throws {
        var s = s
        let rc = ckvm_set_sregs(fd, &s)
        guard rc >= 0 else { throw MachineError(.invalidArgument, "KVM_SET_SREGS failed: \(Errno.text(-rc))", operation: "set vCPU registers") }
    }

    /// RIP, for messages; "?" when KVM will not say.
    private func ripText() -> String {
        guard let r = try? registers() else { return "?" }
        return "0x" + String(r.rip, radix: 16)
    }

    // MARK: - Run loop

    /// Runs the vCPU on the calling (dedicated) thread with `KVM_RUN` until an exit the
    /// machine must handle: port and MMIO accesses are dispatched to the buses in between.
    /// - Returns: why it stopped (`.shutdown`, `.reset`, `.stopped`, `.crashed(...)`).
    public func run() -> VCPUExit {
        guard Self.kickHandlerInstalled else { return .crashed("cannot install the vCPU kick signal handler") }
        let started: Bool = lock.withLock {
            if stopRequested || runningThread != nil { return false }
            runningThread = ckvm_current_thread()
            return true
        }
        guard started else { return lock.withLock { stopRequested } ? .stopped : .crashed("vCPU \(id) is already running") }
        _ = ckvm_unblock_signal(Self.kickSignal)
        exits.store(0, ordering: .relaxed)
        let exit = loop()
        lock.withLock { runningThread = nil }
        return exit
    }

    /// Asks a running ``run()`` to return `.stopped` soon: sets `immediate_exit` and kicks the
    /// thread out of `KVM_RUN` with a signal. Safe from any thread.
    public func requestStop() {
        lock.withLock {
            stopRequested = true
            // SAFETY: the run page stays mapped until deinit, which cannot run while
            // `self` is borrowed here.
            ckvm_run_set_immediate_exit(runPage, 1)
            // The thread clears runningThread under this lock before leaving run(), so it
            // is alive while signalled.
            if let t = runningThread { _ = ckvm_kick(t, Self.kickSignal) }
            lock.broadcast()
        }
    }

    private var shouldStop: Bool { lock.withLock { stopRequested } }

    private func loop() -> VCPUExit {
        while true {
            if shouldStop { return .stopped }
            let rc = ckvm_run(fd)
            if rc == -EINTR || rc == -EAGAIN {
                if shouldStop { return .stopped }
                // A stray signal: clear immediate_exit and go on (the check at the top
                // catches a stop that raced with this).
                ckvm_run_set_immediate_exit(runPage, 0)
                continue
            }
            guard rc >= 0 else { return .crashed("KVM_RUN failed at RIP \(ripText()): \(Errno.text(-rc))") }
            exits.add(1, ordering: .relaxed)
            if let exit = handleExit() { return exit }
        }
    }

    /// Handles one exit; non-nil ends the run loop.
    private func handleExit() -> VCPUExit? {
        let reason = ckvm_run_exit_reason(runPage)
        switch Int32(reason) {
        case KVM_EXIT_IO: handlePortIO(); return nil
        case KVM_EXIT_MMIO: handleMMIO(); return nil
        case KVM_EXIT_INTR: return nil
        case KVM_EXIT_HLT: return handleHalt()
        case KVM_EXIT_SHUTDOWN:
            return .crashed("triple fault (KVM_EXIT_SHUTDOWN) at RIP \(ripText())")
        case KVM_EXIT_FAIL_ENTRY:
            let why = ckvm_run_fail_entry_reason(runPage)
            return .crashed("KVM could not enter the guest (KVM_EXIT_FAIL_ENTRY, hardware reason 0x\(String(why, radix: 16))) at RIP \(ripText())")
        case KVM_EXIT_INTERNAL_ERROR:
            let sub = ckvm_run_internal_suberror(runPage)
            var data = [UInt64](repeating: 0, count: 16)
            let n = Int(ckvm_run_internal_data(runPage, &data, 16))
            let words = data.prefix(n).map { "0x" + String($0, radix: 16) }.joined(separator: " ")
            return .crashed("KVM internal error (suberror \(sub)\(Self.suberrorName(sub))\(n > 0 ? ", data " + words : "")) at RIP \(ripText())")
        case KVM_EXIT_SYSTEM_EVENT:
            switch Int32(ckvm_run_system_event_type(runPage)) {
            case KVM_SYSTEM_EVENT_SHUTDOWN: return .shutdown
            case KVM_SYSTEM_EVENT_RESET: return .reset
            default: return .crashed("KVM system event \(ckvm_run_system_event_type(runPage)) at RIP \(ripText())")
            }
        default:
            return .crashed("unhandled KVM exit reason \(reason) at RIP \(ripText())")
        }
    }

    private static func suberrorName(_ s: UInt32) -> String {
        switch Int32(s) {
        case KVM_INTERNAL_ERROR_EMULATION: return ": instruction emulation failed"
        case KVM_INTERNAL_ERROR_SIMUL_EX: return ": exception while delivering an exception"
        case KVM_INTERNAL_ERROR_DELIVERY_EV: return ": exception during event delivery"
        default: return ""
        }
    }

    /// HLT: the machine has no interrupt controller, so nothing can wake a halted vCPU.
    /// With interrupts disabled that is the guest's way to power off; with them enabled the
    /// vCPU sleeps until the machine stops it.
    private func handleHalt() -> VCPUExit {
        guard let r = try? registers() else { return .crashed("HLT, and KVM_GET_REGS failed") }
        let interruptsEnabled = r.rflags & 0x200 != 0
        if !interruptsEnabled { return .shutdown }
        return lock.withLock {
            while !stopRequested { lock.wait() }
            return .stopped
        }
    }

    private func handlePortIO() {
        var direction: UInt8 = 0, size: UInt8 = 0, port: UInt16 = 0, count: UInt32 = 0
        ckvm_run_io(runPage, &direction, &size, &port, &count)
        // SAFETY: KVM places `count * size` data bytes at data_offset inside the kvm_run
        // mapping (at most a page); sizes are 1, 2 or 4.
        let data = UnsafeMutableRawPointer(ckvm_run_io_data(runPage)!)
        let n = Int(size)
        guard n == 1 || n == 2 || n == 4 else { return }
        for i in 0..<Int(count) {
            let p = data + i * n
            if direction == UInt8(KVM_EXIT_IO_OUT) {
                if !ports.write(UInt64(port), size: n, value: Self.load(p, n)) { unhandled.add(1, ordering: .relaxed) }
            } else {
                let v = ports.read(UInt64(port), size: n)
                if v == nil { unhandled.add(1, ordering: .relaxed) }
                Self.store(v ?? ~0, p, n)
            }
        }
    }

    private func handleMMIO() {
        var address: UInt64 = 0, len: UInt32 = 0, isWrite: UInt8 = 0
        ckvm_run_mmio(runPage, &address, &len, &isWrite)
        // SAFETY: kvm_run.mmio.data is 8 bytes inside the mapping; len is at most 8.
        let data = UnsafeMutableRawPointer(ckvm_run_mmio_data(runPage)!)
        let n = Int(min(len, 8))
        if isWrite != 0 {
            if !mmio.write(address, size: n, value: Self.load(data, n)) { unhandled.add(1, ordering: .relaxed) }
        } else {
            let v = mmio.read(address, size: n)
            if v == nil { unhandled.add(1, ordering: .relaxed) }
            Self.store(v ?? 0, data, n)
        }
    }

    /// Little-endian load of `n` (≤ 8) bytes.
    private static func load(_ p: UnsafeMutableRawPointer, _ n: Int) -> UInt64 {
        // SAFETY: `p` points into the mapped `kvm_run` page at the exit's data (the I/O data area or
        // `mmio.data[8]`), and KVM reports `n <= 8`.
        var v: UInt64 = 0
        for i in 0..<n { v |= UInt64(p.load(fromByteOffset: i, as: UInt8.self)) << (8 * i) }
        return v
    }

    /// Little-endian store of the low `n` (≤ 8) bytes of `v`.
    // SAFETY: as for `load`: `p` is the exit's data area in the `kvm_run` page and `n <= 8`.
    private static func store(_ v: UInt64, _ p: UnsafeMutableRawPointer, _ n: Int) {
        for i in 0..<n { p.storeBytes(of: UInt8(truncatingIfNeeded: v >> (8 * i)), toByteOffset: i, as: UInt8.self) }
    }
}
