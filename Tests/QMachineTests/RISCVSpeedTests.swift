// Interpreter speed: a loop of typical kernel-like work (ALU, loads and stores through
// Sv39 translation, branches, calls, compressed code). Prints MIPS; measured in a release
// build with:
//   swift build -c release --build-tests -Xswiftc -enable-testing --scratch-path .build-cpu
//   QMACHINE_MIPS=200 .build-cpu/release/QBlockPackageTests.xctest --testing-library swift-testing --filter RISCVSpeed
// (QMACHINE_MIPS is the number of millions of loop iterations; the default keeps debug test runs short.)
import Foundation
import Testing
@testable import QMachine

@Suite(.enabled(if: RVAsm.available, Comment(rawValue: RVAsm.skipMessage)))
struct RISCVSpeedTests {
    @Test func interpreterSpeed() throws {
        let millions = Int(ProcessInfo.processInfo.environment["QMACHINE_MIPS"] ?? "") ?? 0
        let iterations = millions > 0 ? millions * 1_000_000 / 16 : 20_000
        let m = try RVAsm.machine("""
          li t0, 0x80100000
          li t1, 0x200000CF
          sd t1, 16(t0)
          li t0, (8 << 60) | 0x80100
          csrw satp, t0
          sfence.vma
          .option rvc
          li s2, \(iterations)
          la s3, buf
          li s4, 0
          li s5, 0x9e3779b97f4a7c15
        1:
          ld t0, 0(s3)
          add t0, t0, s5
          sd t0, 0(s3)
          srli t1, t0, 7
          xor s4, s4, t1
          andi t2, t1, 0x38
          add t2, t2, s3
          lw t3, 8(t2)
          addw s4, s4, t3
          sw s4, 8(t2)
          call leaf
          addi s2, s2, -1
          bnez s2, 1b
          j 2f
        leaf:
          slli a2, s4, 3
          sub a2, a2, s4
          ret
        .balign 64
        buf: .zero 128
        2:
          .option norvc
        """)
        var ts0 = timespec(); clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts0)
        let exit = RVAsm.runWithWatchdog(m.hart, seconds: 600)
        var ts1 = timespec(); clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts1)
        let cpu = Double(ts1.tv_sec - ts0.tv_sec) + Double(ts1.tv_nsec - ts0.tv_nsec) / 1e9
        #expect(exit == .shutdown)
        let n = m.hart.instructionsRetired
        #expect(n > UInt64(iterations) * 16)
        print("RISCVHart: \(n) instructions in \(cpu) s of CPU: \(Int(Double(n) / cpu / 1e6)) MIPS")
    }
}
