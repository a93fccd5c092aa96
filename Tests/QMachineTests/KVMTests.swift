import Foundation
import Testing
import TestSupport
@testable import QMachine

/// Building the x86_64-micro guests from `guests/x86-micro/*.S` with the toolchain's
/// clang and ld.lld, and deciding whether the KVM tests can run here.
enum KVMGuestKit {
    /// The KVM device the tests use: `$QMACHINE_KVM_DEVICE` (point it at a missing path to
    /// see the skips), else /dev/kvm.
    static let devicePath = ProcessInfo.processInfo.environment["QMACHINE_KVM_DEVICE"] ?? KVMHypervisor.defaultPath

    /// Why KVM cannot be used here (absent, refused, or KVM_CREATE_VM failing), or nil.
    static let kvmUnavailable: String? = {
        guard let why = KVMHypervisor.unavailableReason(path: devicePath) else { return nil }
        let text = "KVM unavailable: \(why); KVM test skipped"
        print(text)
        return text
    }()

    /// The repository's `guests/x86-micro`.
    static let sourceDirectory: String = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("guests/x86-micro").path

    /// clang and ld.lld: `$CLANG`/`$LLD`, else next to the `swift` in use, else on PATH.
    static let toolchain: (clang: String, lld: String)? = {
        let env = ProcessInfo.processInfo.environment
        let fm = FileManager.default
        var dirs: [String] = []
        if let swift = Tools.which("swift") {
            let real = (try? fm.destinationOfSymbolicLink(atPath: swift)).map {
                $0.hasPrefix("/") ? $0 : URL(fileURLWithPath: swift).deletingLastPathComponent().appendingPathComponent($0).path
            } ?? swift
            dirs.append(URL(fileURLWithPath: real).deletingLastPathComponent().path)
        }
        dirs.append("/opt/swift/usr/bin")
        func find(_ name: String, _ override: String?) -> String? {
            if let o = override, fm.isExecutableFile(atPath: o) { return o }
            for d in dirs where fm.isExecutableFile(atPath: "\(d)/\(name)") { return "\(d)/\(name)" }
            return Tools.which(name)
        }
        guard let clang = find("clang", env["CLANG"]), let lld = find("ld.lld", env["LLD"]) else { return nil }
        return (clang, lld)
    }()

    /// Why the guest tests cannot run, or nil.
    static let skipReason: String? = {
        if let k = kvmUnavailable { return k }
        if toolchain == nil {
            let text = "clang or ld.lld not found (set CLANG and LLD); KVM guest test skipped"
            print(text)
            return text
        }
        return nil
    }()

    /// Assembles and links `guests/x86-micro/<name>.S` into `<dir>/<name>.bin`.
    static func build(_ name: String, in dir: TempDir) throws -> String {
        guard let tc = toolchain else { throw RunError.notFound("clang") }
        let obj = dir.file("\(name).o"), bin = dir.file("\(name).bin")
        try mustRun(tc.clang, "--target=x86_64-unknown-none", "-c", "\(sourceDirectory)/\(name).S", "-o", obj)
        try mustRun(tc.lld, "-T", "\(sourceDirectory)/guest.ld", "--oformat", "binary", obj, "-o", bin)
        return bin
    }

    /// A machine configuration for `firmware` on the tests' KVM device.
    static func configuration(_ firmware: String, serial: any SerialBackend = BufferSerialBackend()) -> X86MicroMachine.Configuration {
        var c = X86MicroMachine.Configuration(firmwarePath: firmware, serial: serial)
        c.kvmPath = devicePath
        return c
    }

    /// Builds `name` and runs it on an x86_64-micro machine; returns the exit and the UART's output.
    static func run(_ name: String, cpus: Int = 1, timeout: Double = 60) throws -> (exit: VCPUExit, output: String, seconds: Double) {
        let dir = TempDir("kvm-guest")
        let bin = try build(name, in: dir)
        let serial = BufferSerialBackend()
        var config = X86MicroMachine.Configuration(firmwarePath: bin, serial: serial)
        config.cpus = cpus
        config.kvmPath = devicePath
        let machine = try X86MicroMachine(config)
        let start = ContinuousClock.now
        let exit = machine.runBlocking(timeout: timeout)
        let elapsed = ContinuousClock.now - start
        let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
        return (exit, serial.text, seconds)
    }
}

let kvmTrait = Testing.ConditionTrait.enabled(if: KVMGuestKit.kvmUnavailable == nil,
                                              Comment(rawValue: KVMGuestKit.kvmUnavailable ?? ""))
let kvmGuestTrait = Testing.ConditionTrait.enabled(if: KVMGuestKit.skipReason == nil,
                                                   Comment(rawValue: KVMGuestKit.skipReason ?? ""))

@Suite(.serialized) struct KVMTests {
    @Test(kvmTrait) func apiVersionAndVM() throws {
        let kvm = try KVMHypervisor(path: KVMGuestKit.devicePath)
        #expect(kvm.apiVersion == 12)
        let vm = try kvm.createVirtualMachine()
        let ram = try GuestRAM(base: 0, size: 1 << 20)
        try vm.map(ram)
        #expect(vm.memory.count == 1)
        // Overlapping RAM is refused before KVM sees it.
        let other = try GuestRAM(base: 0x8_0000, size: 1 << 20)
        #expect(throws: MachineError.self) { try vm.map(other) }
        let cpu = try vm.createVCPU(id: 0, ports: Bus(), mmio: Bus())
        #expect(cpu.id == 0)
        #expect(throws: MachineError.self) { _ = try vm.createVCPU(id: 0, ports: Bus(), mmio: Bus()) }
    }

    @Test func absentDeviceIsAClearError() {
        do {
            _ = try KVMHypervisor(path: "/nonexistent/kvm")
            Issue.record("opening a missing KVM device succeeded")
        } catch let e as MachineError {
            #expect(e.code == .unsupported)
            #expect(e.message.contains("does not exist"))
        } catch {
            Issue.record("unexpected error \(error)")
        }
        #expect(KVMHypervisor.unavailableReason(path: "/nonexistent/kvm") != nil)
        // A device that is not KVM: opens, then refuses KVM_GET_API_VERSION.
        do {
            _ = try KVMHypervisor(path: "/dev/null")
            Issue.record("/dev/null was taken for KVM")
        } catch let e as MachineError {
            #expect(e.code == .unsupported)
            #expect(e.message.contains("KVM_GET_API_VERSION failed"), "\(e.message)")
        } catch {
            Issue.record("unexpected error \(error)")
        }
    }

    @Test(kvmGuestTrait) func helloOverUART() throws {
        let r = try KVMGuestKit.run("hello")
        #expect(r.exit == .shutdown, "output: \(r.output)")
        #expect(r.output == "hello from x86_64-micro vCPU 0\n")
    }

    @Test(kvmGuestTrait) func twoVCPUsEachOnTheirThread() throws {
        // Both vCPUs run the same firmware, taking turns through a word in guest RAM
        // (so both really run at once); vCPU 0 powers off last.
        let r = try KVMGuestKit.run("hello", cpus: 2)
        #expect(r.exit == .shutdown, "output: \(r.output)")
        #expect(r.output == "hello from x86_64-micro vCPU 0\nhello from x86_64-micro vCPU 1\n")
    }

    @Test(kvmGuestTrait) func tripleFaultIsACrashNotAHang() throws {
        let r = try KVMGuestKit.run("triple-fault", timeout: 60)
        #expect(r.output == "about to fault\n")
        guard case .crashed(let why) = r.exit else {
            Issue.record("expected a crash, got \(r.exit)")
            return
        }
        #expect(why.contains("triple fault"), "\(why)")
        #expect(why.contains("RIP 0x"), "\(why)")
    }

    @Test(kvmGuestTrait) func stopEndsASpinningGuest() throws {
        // A guest spinning with interrupts enabled (jmp .) never exits on its own.
        let dir = TempDir("kvm-spin")
        let bin = dir.file("spin.bin")
        try writeFile(bin, at: 0, [0xfb, 0xeb, 0xfe])   // sti; jmp .
        let machine = try X86MicroMachine(KVMGuestKit.configuration(bin))
        let exit = machine.runBlocking(timeout: 1)
        #expect(exit == .stopped)
    }

    @Test(kvmGuestTrait) func haltWithInterruptsEnabledWaitsForStop() throws {
        let dir = TempDir("kvm-halt")
        let bin = dir.file("halt.bin")
        try writeFile(bin, at: 0, [0xfb, 0xf4, 0xeb, 0xfd])   // sti; hlt; jmp back to hlt
        let machine = try X86MicroMachine(KVMGuestKit.configuration(bin))
        #expect(machine.runBlocking(timeout: 0.5) == .stopped)
    }

    @Test(kvmGuestTrait) func portIOAndMMIOExitsReachTheBuses() throws {
        let dir = TempDir("kvm-bus")
        let bin = try KVMGuestKit.build("bus-exits", in: dir)
        let firmware = try BootFiles.read(bin, what: "firmware")
        let kvm = try KVMHypervisor(path: KVMGuestKit.devicePath)
        let vm = try kvm.createVirtualMachine()
        let ram = try GuestRAM(base: 0, size: 2 << 20)
        try X86LongModeBoot.writeTables(into: ram)
        try firmware.withUnsafeBytes { try ram.write($0, at: 0x10_0000) }
        try vm.map(ram)
        let ports = Bus(), mmio = Bus()
        let port80 = RecordingDevice(), port84 = RecordingDevice(answer: 0x1122_3344), com1 = RecordingDevice()
        let window = RecordingDevice(answer: 0x0a0b_0c0d_0e0f_1011)
        try ports.map(base: 0x80, size: 4, device: port80)
        try ports.map(base: 0x84, size: 4, device: port84)
        try ports.map(base: 0x3f8, size: 8, device: com1)
        try mmio.map(base: 0xd000_0000, size: 0x1000, device: window)
        let cpu = try vm.createVCPU(id: 0, ports: ports, mmio: mmio)
        try X86LongModeBoot.start(cpu, entry: 0x10_0000, stack: 0x10_0000, arguments: (0, 0, 0))

        #expect(cpu.run() == .shutdown)
        #expect(port80.accesses == [.init(write: true, offset: 0, size: 1, value: 0xa1),
                                    .init(write: true, offset: 0, size: 2, value: 0xb2c3),
                                    .init(write: true, offset: 0, size: 4, value: 0xd4e5_f607)])
        #expect(port84.accesses == [.init(write: false, offset: 0, size: 4, value: 0x1122_3344)])
        #expect(com1.accesses.map { UInt8($0.value) } == Array("rep\n".utf8))
        #expect(window.accesses == [.init(write: true, offset: 0, size: 8, value: 0x0102_0304_0506_0708),
                                    .init(write: false, offset: 0, size: 8, value: 0x0a0b_0c0d_0e0f_1011)])
        let r = try cpu.registers()
        #expect(r.rbx == 0x1122_3344)
        #expect(r.r8 == 0x0a0b_0c0d_0e0f_1011)
        #expect(r.r9 == 0, "unmapped MMIO reads 0")
        #expect(r.rcx == 0xff, "unmapped ports read all-ones")
        #expect(cpu.unhandledAccesses == 2)
    }

    @Test func missingFirmwareIsABadImage() {
        #expect(throws: MachineError.self) {
            _ = try X86MicroMachine(.init(firmwarePath: "/nonexistent/fw.bin", serial: BufferSerialBackend()))
        }
    }
}

/// A bus device that records every access and answers reads with a fixed value.
final class RecordingDevice: BusDevice, @unchecked Sendable {
    struct Access: Equatable { var write: Bool; var offset: UInt64; var size: Int; var value: UInt64 }
    private let lock = DeviceLock()
    private var log: [Access] = []
    private let answer: UInt64
    init(answer: UInt64 = 0) { self.answer = answer }
    var accesses: [Access] { lock.withLock { log } }
    func read(offset: UInt64, size: Int) -> UInt64 {
        let v = size == 8 ? answer : answer & ((1 << (8 * UInt64(size))) - 1)
        lock.withLock { log.append(Access(write: false, offset: offset, size: size, value: v)) }
        return v
    }
    func write(offset: UInt64, size: Int, value: UInt64) {
        lock.withLock { log.append(Access(write: true, offset: offset, size: size, value: value)) }
    }
}
