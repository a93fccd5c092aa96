import QBlock

/// What QMP's machine commands need from a running machine.
public protocol MonitoredMachine: AnyObject, Sendable {
    /// Stops the vCPUs and waits until no device request is in flight (the caller flushes).
    /// Throws, with nothing changed, when the machine cannot be paused.
    func pause() async throws
    /// Lets paused vCPUs run again.
    func resume()
    /// Ends the run for good (the vCPU thread returns); the caller then shuts down.
    func stop()
}

/// The machine command group of a monitor (QEMU's `qmp_stop`, `qmp_cont`, …), registered
/// from QMachine into QBlock's ``QMPMonitor``: `stop`, `cont`, `query-status`,
/// `system_powerdown`, `system_reset`, `quit`, and the events `STOP`, `RESUME`,
/// `SHUTDOWN` and `POWERDOWN`.
///
/// Behaviour, as QEMU 7.2's `riscv64` `virt` board with `-no-reboot` (the `vm` tool treats
/// a guest reboot as a power-off):
/// - `stop` parks the vCPU, waits for every virtio-blk request in flight and flushes every
///   writable drive and every node of the graph before it answers (`STOP` is sent just before the answer), so an
///   external copy of a stopped guest's disks is consistent; a second `stop` does nothing.
/// - `cont` resumes a paused guest (`RESUME`); on a running guest it does nothing; after
///   a shutdown it fails as QEMU does ("Resetting the Virtual Machine is required").
/// - `system_powerdown` sends `POWERDOWN`; like QEMU's riscv `virt`, the machine has no
///   power button device, so the guest does not see it.
/// - `system_reset` ends the run like a guest reboot under `-no-reboot`:
///   `SHUTDOWN {"guest": false, "reason": "host-qmp-system-reset"}`, then the process exits.
/// - `quit` answers, sends `SHUTDOWN {"guest": false, "reason": "host-qmp-quit"}` and exits.
/// - When the guest powers off, reboots or crashes: `SHUTDOWN` with `guest: true` and
///   `guest-shutdown`, `guest-reset` or `guest-panic`; a signal gives `host-signal`.
// @unchecked: `_status` and `requestedCause` are only touched with `lock` held; `monitor` and `machine`
// are immutable.
public final class MachineControl: @unchecked Sendable {
    /// QEMU's `RunState` values this machine goes through.
    public enum Status: String, Sendable {
        case running, paused, shutdown
    }

    /// QEMU's `ShutdownCause` values this machine reports.
    public enum ShutdownCause: String, Sendable {
        case guestShutdown = "guest-shutdown"
        case guestReset = "guest-reset"
        case guestPanic = "guest-panic"
        case hostQMPQuit = "host-qmp-quit"
        case hostQMPSystemReset = "host-qmp-system-reset"
        case hostSignal = "host-signal"

        /// Whether the guest caused the shutdown (the `guest` member of QMP's `SHUTDOWN` event).
        public var isGuest: Bool {
            switch self {
            case .guestShutdown, .guestReset, .guestPanic: return true
            default: return false
            }
        }
    }

    /// The QMP monitor the machine commands are registered on.
    public let monitor: QMPMonitor
    /// The machine being controlled.
    public let machine: any MonitoredMachine
    private let lock = PosixMutex()
    private var _status = Status.running
    private var requestedCause: ShutdownCause?

    /// Registers the machine commands into `monitor` (replacing the daemon's `quit`).
    public init(monitor: QMPMonitor, machine: any MonitoredMachine) {
        self.monitor = monitor
        self.machine = machine
        register()
        monitor.onQuit { [weak self] in self?.requestShutdown(.hostQMPQuit) }
    }

    /// The run state `query-status` reports.
    public var status: Status { lock.withLock { _status } }

    /// Ends the run for a host reason (signal, `quit`, `system_reset`).
    public func requestShutdown(_ cause: ShutdownCause) {
        let first: Bool = lock.withLock {
            if requestedCause != nil || _status == .shutdown { return false }
            requestedCause = cause
            return true
        }
        if first { machine.stop() }
    }

    /// Called once the vCPU thread has ended with `exit`: records the cause, sets the status
    /// to `shutdown` and sends `SHUTDOWN`.
    @discardableResult
    public func machineEnded(_ exit: VCPUExit) -> ShutdownCause {
        let cause: ShutdownCause = lock.withLock {
            _status = .shutdown
            if let c = requestedCause { return c }
            switch exit {
            case .shutdown: return .guestShutdown
            case .reset: return .guestReset
            case .crashed: return .guestPanic
            case .stopped: return .hostSignal
            }
        }
        monitor.emit(event: "SHUTDOWN", data: QObject.Dict([("guest", .bool(cause.isGuest)), ("reason", .string(cause.rawValue))]))
        return cause
    }

    private func register() {
        monitor.register("stop") { [unowned self] args, ctx in
            try args.done()
            guard status == .running else { return .dict(QObject.Dict()) }
            try await machine.pause()
            var failure: (any Error)?
            do {
                // bdrv_flush_all: every node, not only the devices' tops (a job may have
                // written below them, as commit does into the base).
                for n in ctx.graph.nodes where !n.isReadOnly { try await n.flush() }
            } catch {
                failure = error     // as QEMU: the guest stays stopped, the command fails
            }
            let stopped: Bool = lock.withLock {
                guard _status == .running else { return false }
                _status = .paused
                return true
            }
            if stopped { ctx.emit(event: "STOP") }
            if let failure { throw failure }
            return .dict(QObject.Dict())
        }
        monitor.register("cont") { [unowned self] args, ctx in
            try args.done()
            switch status {
            case .shutdown: throw QMPError.generic("Resetting the Virtual Machine is required")
            case .running: return .dict(QObject.Dict())
            case .paused:
                lock.withLock { _status = .running }
                ctx.emit(event: "RESUME")
                machine.resume()
                return .dict(QObject.Dict())
            }
        }
        monitor.register("query-status", exclusive: false) { [unowned self] args, _ in
            try args.done()
            let s = status
            return .dict(QObject.Dict([("status", .string(s.rawValue)), ("singlestep", .bool(false)), ("running", .bool(s == .running))]))
        }
        monitor.register("system_powerdown") { args, ctx in
            try args.done()
            ctx.emit(event: "POWERDOWN")
            return .dict(QObject.Dict())
        }
        monitor.register("system_reset") { [unowned self] args, _ in
            try args.done()
            requestShutdown(.hostQMPSystemReset)
            return .dict(QObject.Dict())
        }
        monitor.register("quit", exclusive: false) { args, _ in
            try args.done()
            return .dict(QObject.Dict())
        }
    }
}

extension RISCVVirtMachine: MonitoredMachine {}

/// `x86_64-micro` (KVM): `quit`, `system_reset` and the `SHUTDOWN` events work; `stop` is
/// refused (its vCPU threads end on a stop request rather than park).
extension X86MicroMachine: MonitoredMachine {
    /// Always fails: the x86_64-micro vCPU threads end on a stop request instead of parking.
    /// - Throws: a QMP `GenericError`, as QMP's `stop` then reports.
    public func pause() async throws {
        throw QMPError.generic("stop is not supported on \(X86MicroMachine.name)")
    }
    /// Does nothing: the machine never pauses.
    public func resume() {}
}
