import ArgumentParser
import Foundation
import QBlock
import QMachine
import ToolSupport
#if canImport(Glibc)
import Glibc
#endif

/// How `vm` reports errors: "vm: message".
let tool = ToolProgram.invoked(as: "vm")

/// `vm`: boots a Linux kernel on a QMachine machine, with disks served by QBlock.
///
///     vm --machine riscv64-virt --kernel Image [--initrd FILE] [--append "…"]
///        [--drive file=PATH[,format=qcow2|raw][,id=NAME][,readonly=on]]… [--memory 512M]
///        [--serial stdio|unix:PATH] [--qmp PATH]
///     vm --machine x86_64-micro --accel kvm --firmware FILE [--drive …]… [--memory 16M] [--qmp PATH]
///
/// Drives live in a block graph behind backends named by their `id` (QBlock's
/// `BlockBackend`), so `--qmp PATH` serves QBlock's QMP monitor on a Unix socket with every
/// block command acting on the guest's disks, plus the machine commands of
/// `MachineControl` (`stop`, `cont`, `query-status`, `system_reset`, `quit`, …).
///
/// Exit status: 0 when the guest powers off (or on QMP `quit`/`system_reset`); 1 on a
/// crash, a reboot request (treated as QEMU's -no-reboot does), a signal, or anything that
/// stops the machine from starting.
@main
struct VM: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "vm",
        abstract: "Run a virtual machine (riscv64-virt, x86_64-micro) with virtio-blk disks on QBlock.")

    @Option(name: .customLong("machine"), help: "Machine type (riscv64-virt, x86_64-micro).")
    var machine: String = RISCVVirtMachine.name

    @Option(name: .customLong("accel"), help: "Accelerator: tcg (software CPU, riscv64-virt) or kvm (x86_64-micro).")
    var accel: String?

    @Option(name: .customLong("kernel"), help: "Linux kernel Image to boot (riscv64-virt).")
    var kernel: String?

    @Option(name: .customLong("firmware"), help: "Flat binary entered in 64-bit mode at 1 MiB (x86_64-micro).")
    var firmware: String?

    @Option(name: .customLong("initrd"), help: "Initial ramdisk (cpio, optionally compressed).")
    var initrd: String?

    @Option(name: .customLong("append"), help: "Kernel command line.")
    var append: String = ""

    @Option(name: .customLong("drive"), help: "A virtio-blk disk: file=PATH[,format=raw|qcow2][,id=NAME][,readonly=on]. Repeatable; the first is /dev/vda.")
    var drives: [String] = []

    @Option(name: [.customShort("m"), .customLong("memory")], help: "Guest RAM (e.g. 512M, 1G; default 512M, 16M for x86_64-micro).")
    var memory: String?

    @Option(name: .customLong("serial"), help: "Serial port: stdio or unix:PATH (connect to a listening socket).")
    var serial: String = "stdio"

    @Option(name: .customLong("qmp"), help: "Serve QMP on a Unix socket at PATH (as QEMU's -qmp unix:PATH,server=on,wait=off).")
    var qmp: String?

    static func main() async {
        await tool.main(VM.self, usageErrors: .argumentParser) { error in
            switch error {
            case let e as MachineError: return e.description
            case let e as BlockError: return e.description
            case let e as QMPError: return e.desc
            default: return nil
            }
        }
    }

    func validate() throws {
        switch machine {
        case RISCVVirtMachine.name:
            guard kernel != nil else { throw ValidationError("\(machine) needs --kernel") }
            guard accel == nil || accel == "tcg" else { throw ValidationError("\(machine) runs on the software CPU only (--accel tcg)") }
        case X86MicroMachine.name:
            guard firmware != nil else { throw ValidationError("\(machine) needs --firmware") }
            guard accel == nil || accel == "kvm" else { throw ValidationError("\(machine) runs on KVM only (--accel kvm)") }
        default:
            throw ValidationError("unknown machine '\(machine)' (available: \(RISCVVirtMachine.name), \(X86MicroMachine.name))")
        }
        guard serial == "stdio" || serial.hasPrefix("unix:") else {
            throw ValidationError("--serial takes stdio or unix:PATH")
        }
    }

    func run() async throws {
        let memorySize = try memory.map { try MemorySize.parse($0) }
        let specs = try drives.map { try DriveSpec(parsing: $0) }

        // Open every drive into the monitor's graph before the machine exists (the device
        // models get the backends); close them on any way out.
        let monitor = QMPMonitor()
        var opened: [RISCVVirtMachine.Drive] = []
        func closeAll() async -> (any Error)? {
            var first: (any Error)?
            for d in opened {
                do { try await d.node.flush() } catch where !d.readOnly { if first == nil { first = error } } catch {}
                if let b = d.node as? BlockBackend { monitor.graph.detach(b) }
            }
            opened = []
            await monitor.stopNBDServer()
            await monitor.block.closeAll()
            await monitor.block.flushRemaining()
            return first
        }
        do {
            for (i, s) in specs.enumerated() {
                let id = s.id ?? "drive\(i)"
                // Like QEMU's -drive if=virtio: an anonymous virtio-blk device per drive.
                let backend = try await s.attach(to: monitor, id: id, qdev: "/machine/peripheral-anon/device[\(i)]/virtio-backend")
                opened.append(.init(node: backend, id: id, readOnly: s.readOnly))
            }
        } catch {
            _ = await closeAll()
            throw error
        }

        let backend: any SerialBackend
        do {
            backend = serial == "stdio" ? FDSerialBackend.stdio() : try FDSerialBackend.unixSocket(path: String(serial.dropFirst(5)))
        } catch {
            _ = await closeAll()
            throw error
        }

        let vm: any RunnableMachine
        do {
            if machine == X86MicroMachine.name, let firmware {
                var config = X86MicroMachine.Configuration(firmwarePath: firmware, serial: backend)
                config.memorySize = memorySize ?? X86MicroMachine.defaultMemorySize
                config.drives = opened
                vm = try X86MicroMachine(config)
            } else {
                var config = RISCVVirtMachine.Configuration(kernelPath: kernel ?? "", serial: backend)
                config.memorySize = memorySize ?? 512 << 20
                config.initrdPath = initrd
                config.bootargs = append
                config.drives = opened
                vm = try RISCVVirtMachine(config, cpu: .software)
            }
        } catch {
            backend.close()
            _ = await closeAll()
            throw error
        }

        let control = MachineControl(monitor: monitor, machine: vm)
        var server: QMPServer?
        if let qmp {
            let s = QMPServer(monitor: monitor)
            do { try s.listen(unix: qmp) } catch {
                backend.close()
                _ = await closeAll()
                throw error
            }
            server = s
        }

        // SIGINT/SIGTERM stop the hart; the disks are then flushed and closed as on power-off.
        let signals = stopOnSignals(control)
        let started = ContinuousClock.now
        let exit = await vm.run()
        let cause = control.machineEnded(exit)
        signals.forEach { $0.cancel() }
        let quiesceError: (any Error)?
        do { try await vm.quiesce(); quiesceError = nil } catch { quiesceError = error }
        backend.close()
        let closeError = await closeAll()
        await server?.shutdown()
        if ProcessInfo.processInfo.environment["VM_STATS"] != nil {
            let secs = Double((ContinuousClock.now - started).components.attoseconds) / 1e18 + Double((ContinuousClock.now - started).components.seconds)
            let retired = (vm as? RISCVVirtMachine).map { String(format: ", %llu instructions retired", $0.cpu.instructionsRetired) } ?? ""
            FileHandle.standardError.write(Data((String(format: "vm: %.2f s", secs) + retired + "\n").utf8))
        }
        if let e = quiesceError ?? closeError { tool.exitWithError("cannot flush the disks: \(e)") }

        switch cause {
        case .hostQMPQuit, .hostQMPSystemReset: return
        default: break
        }
        switch exit {
        case .shutdown: return
        case .reset: tool.exitWithError("guest requested a reboot")
        case .stopped: tool.exitWithError("stopped by a signal")
        case .crashed(let message):
            // The CPU's message may already start with "guest crash:"; say it once.
            var m = Substring(message)
            for prefix in ["guest crashed: ", "guest crash: "] where m.hasPrefix(prefix) { m = m.dropFirst(prefix.count) }
            tool.exitWithError("guest crashed: \(m)")
        }
    }

    /// Installs SIGINT/SIGTERM handlers that stop the hart.
    private func stopOnSignals(_ control: MachineControl) -> [any DispatchSourceSignal] {
        [SIGINT, SIGTERM].map { sig in
            signal(sig, SIG_IGN)
            let s = DispatchSource.makeSignalSource(signal: sig, queue: .global())
            s.setEventHandler { control.requestShutdown(.hostSignal) }
            s.resume()
            return s
        }
    }
}

/// What the tool needs of a machine, whichever it is (the QMP machine commands too).
protocol RunnableMachine: MonitoredMachine {
    func run() async -> VCPUExit
    func stop()
    func quiesce() async throws
}
extension RISCVVirtMachine: RunnableMachine {}
extension X86MicroMachine: RunnableMachine {}
