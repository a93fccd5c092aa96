// The harness of the RISC-V hart tests: assembles small programs with the toolchain's clang
// (riscv64, rv64gc) and runs them on a RISCVHart with 4 MiB of RAM at 0x8000_0000.
import Dispatch
import Foundation
import Testing
import TestSupport
@testable import QMachine

/// A console that records what the guest writes and serves queued input.
final class RVConsole: SBIPlatform, @unchecked Sendable {
    private let lock = NSLock()
    private var out: [UInt8] = []
    private var input: [UInt8]
    init(input: [UInt8] = []) { self.input = input }
    func consoleWrite(_ bytes: UnsafeRawBufferPointer) { lock.withLock { out.append(contentsOf: bytes) } }
    func consoleRead() -> UInt8? { lock.withLock { input.isEmpty ? nil : input.removeFirst() } }
    var text: String { lock.withLock { String(decoding: out, as: UTF8.self) } }
}

/// A bus device that records the last write and reads back a fixed value.
final class RVScratchDevice: BusDevice, @unchecked Sendable {
    var lastWrite: (offset: UInt64, size: Int, value: UInt64)?
    func read(offset: UInt64, size: Int) -> UInt64 { 0x1122_3344_5566_7788 & (size == 8 ? .max : (1 << (8 * UInt64(size))) - 1) }
    func write(offset: UInt64, size: Int, value: UInt64) { lastWrite = (offset, size, value) }
}

enum RVAsm {
    static let ramBase: UInt64 = 0x8000_0000
    static let deviceBase: UInt64 = 0x1000_0000

    /// The clang that can assemble riscv64 (the Swift toolchain's), or nil.
    static let clang: String? = {
        let candidates = ["/opt/swift/usr/bin/clang", Tools.which("clang")].compactMap { $0 }
        for c in candidates where FileManager.default.isExecutableFile(atPath: c) {
            let dir = TempDir("rv-probe")
            let s = dir.file("p.s")
            try? ".text\nnop\n".write(toFile: s, atomically: true, encoding: .utf8)
            if let r = try? TestSupport.run(c, ["--target=riscv64-unknown-elf", "-march=rv64gc", "-c", s, "-o", dir.file("p.o")]), r.status == 0 {
                return c
            }
        }
        return nil
    }()
    static var available: Bool { clang != nil }
    static let skipMessage = "no clang able to assemble riscv64 (the Swift toolchain's clang at /opt/swift/usr/bin); RISC-V program tests skipped"

    /// Macros and a default trap handler shared by all test programs. The default handler
    /// records scause in s10, stval in s11 and sepc in s9, then shuts down. EXIT clobbers
    /// a0, a1, a6 and a7; sp starts at the end of 4 MiB of RAM.
    static let prelude = """
        .option norvc
        .macro EXIT
          li a7, 0x53525354
          li a6, 0
          li a0, 0
          li a1, 0
          ecall
        .endm
        .macro FPON
          li t6, 0x2000
          csrs sstatus, t6
        .endm
        .macro SBI ext, fn
          li a7, \\ext
          li a6, \\fn
          ecall
        .endm
        .text
        .globl _start
        _start:
          li sp, 0x80400000
          la t6, _default_trap
          csrw stvec, t6
          j _main
        .balign 4
        _default_trap:
          csrr s10, scause
          csrr s11, stval
          csrr s9, sepc
          EXIT
        .balign 4
        _main:

        """

    static func assemble(_ body: String) throws -> [UInt8] {
        guard let clang else { throw RunError.notFound("clang (riscv64)") }
        let dir = TempDir("rv-asm")
        let s = dir.file("t.s"), elf = dir.file("t.elf"), bin = dir.file("t.bin")
        try (prelude + body + "\n  EXIT\n").write(toFile: s, atomically: true, encoding: .utf8)
        let r = try TestSupport.run(clang, ["--target=riscv64-unknown-elf", "-march=rv64gc", "-mno-relax", "-nostdlib", "-fuse-ld=lld",
                                "-Wl,-Ttext=0x80000000", "-Wl,--no-relax", "-o", elf, s])
        guard r.status == 0 else { throw AssemblyError(message: r.stderr) }
        let objcopy = URL(fileURLWithPath: clang).deletingLastPathComponent().appendingPathComponent("llvm-objcopy").path
        let o = try TestSupport.run(objcopy, ["-O", "binary", elf, bin])
        guard o.status == 0 else { throw AssemblyError(message: o.stderr) }
        return Array(try Data(contentsOf: URL(fileURLWithPath: bin)))
    }

    struct AssemblyError: Error, CustomStringConvertible { let message: String; var description: String { message } }

    struct Machine {
        let hart: RISCVHart
        let ram: GuestRAM
        let console: RVConsole
        let device: RVScratchDevice
        func x(_ i: Int) -> UInt64 { hart.register(i) }
        func f(_ i: Int) -> UInt64 { hart.floatRegister(i) }
        func csr(_ n: UInt32) -> UInt64 { hart.readCSR(n) ?? 0xdead }
    }

    /// Builds a machine with the program loaded at the start of RAM.
    static func machine(_ body: String, ramSize: UInt64 = 4 << 20, input: [UInt8] = []) throws -> Machine {
        let bytes = try assemble(body)
        let ram = try GuestRAM(base: ramBase, size: ramSize)
        try bytes.withUnsafeBytes { try ram.write($0, at: ramBase) }
        let bus = Bus()
        let device = RVScratchDevice()
        try bus.map(base: deviceBase, size: 0x1000, device: device)
        let console = RVConsole(input: input)
        let hart = RISCVHart(ram: ram, bus: bus, platform: console)
        hart.pc = ramBase
        return Machine(hart: hart, ram: ram, console: console, device: device)
    }

    /// Assembles and runs `body` until the guest shuts down (or 10 s pass: `.stopped`).
    static func run(_ body: String, ramSize: UInt64 = 4 << 20, input: [UInt8] = [],
                    setup: (Machine) -> Void = { _ in }) throws -> (Machine, VCPUExit) {
        let m = try machine(body, ramSize: ramSize, input: input)
        setup(m)
        let exit = runWithWatchdog(m.hart, seconds: 10)
        return (m, exit)
    }

    static func runWithWatchdog(_ hart: RISCVHart, seconds: Double) -> VCPUExit {
        let done = DispatchSemaphore(value: 0)
        DispatchQueue.global().async {
            if done.wait(timeout: .now() + seconds) == .timedOut { hart.requestStop() }
        }
        let exit = hart.run()
        done.signal()
        return exit
    }
}

// Register numbers used by the tests.
let t0 = 5, t1 = 6, t2 = 7, s0 = 8, s1 = 9, a0 = 10, a1 = 11, a2 = 12, a3 = 13, a4 = 14, a5 = 15
let s2 = 18, s3 = 19, s4 = 20, s5 = 21, s6 = 22, s7 = 23, s8 = 24, s9 = 25, s10 = 26, s11 = 27
let t3 = 28, t4 = 29, t5 = 30

@Suite(.enabled(if: RVAsm.available, Comment(rawValue: RVAsm.skipMessage)))
struct RISCVHarnessTests {
    @Test func runsAProgramToShutdown() throws {
        let (m, exit) = try RVAsm.run("""
          li s2, 40
          addi s2, s2, 2
        """)
        #expect(exit == .shutdown)
        #expect(m.x(s2) == 42)
        #expect(m.hart.instructionsRetired > 5)
    }

    @Test func consoleAndSBIBase() throws {
        let (m, exit) = try RVAsm.run("""
          li a0, 'h'
          SBI 0x01, 0
          li a0, 'i'
          SBI 0x4442434E, 2
          la a1, msg
          li a0, 3
          li a2, 0
          SBI 0x4442434E, 0
          mv s3, a1
          SBI 0x10, 0
          mv s2, a1
          li a0, 0x4442434E
          SBI 0x10, 3
          mv s4, a1
          li a0, 0x504D55
          SBI 0x10, 3
          mv s5, a1
          SBI 0x504D55, 0
          mv s6, a0
          SBI 0x02, 0
          mv s7, a0
          j 1f
        msg: .ascii "abc"
        .balign 4
        1:
        """, input: [0x41])
        #expect(exit == .shutdown)
        #expect(m.console.text == "hiabc")
        #expect(m.x(s3) == 3)
        #expect(m.x(s2) == 2 << 24)
        #expect(m.x(s4) == 1)
        #expect(m.x(s5) == 0)
        #expect(Int64(bitPattern: m.x(s6)) == -2)
        #expect(m.x(s7) == 0x41)
    }
}
