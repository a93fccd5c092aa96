// Privileged architecture as seen from S-mode: CSRs, traps, U-mode, Sv39/Sv48 paging,
// misaligned accesses, interrupts and WFI, the SBI, crash reports, code invalidation.
import Dispatch
import Foundation
import Testing
@testable import QMachine

/// A handler for exceptions and interrupts. Exceptions: counts them in s8, records
/// scause/stval/sepc in s10/s11/s9 and steps over the faulting instruction (for a fetch
/// fault it returns to ra). Interrupts: appends the cause to s6 (a byte each) and clears
/// that interrupt's bit in sie. An exception with s0 = 0x5e shuts down (the exit from U-mode).
private let resumingHandler = """
  j _after_resume
.balign 4
_resume:
  li t6, 0x5e
  bne s0, t6, 3f
  EXIT
3:
  csrr t6, scause
  blt t6, zero, 1f
  addi s8, s8, 1
  csrr s10, scause
  csrr s11, stval
  csrr s9, sepc
  li t6, 12
  beq s10, t6, 2f
  addi s9, s9, 4
  csrw sepc, s9
  sret
2:
  csrw sepc, ra
  sret
1:
  andi t6, t6, 63
  slli s6, s6, 8
  or s6, s6, t6
  li t6, 1
  csrr s7, scause
  sll t6, t6, s7
  csrc sie, t6
  sret
_after_resume:
  la t6, _resume
  csrw stvec, t6

"""

/// Sv39 page tables at 0x80100000: the first GiB of RAM identity-mapped by a gigapage
/// (RWX, A, D), and 4 KiB pages at VA 0x4000_0000: +0 read-only (A set), +0x1000 RW user
/// with A/D clear (PA 0x80104000), +0x2000 RW not executable, +0x3000 a misaligned 2 MiB
/// superpage entry one level up at VA 0x4020_0000.
private let pageTables = """
  li t0, 0x80100000
  li t1, 0x200000CF
  sd t1, 16(t0)
  li t1, (0x80101 << 10) | 1
  sd t1, 8(t0)
  li t0, 0x80101000
  li t1, (0x80102 << 10) | 1
  sd t1, 0(t0)
  li t1, (0x80105 << 10) | 0xCF
  sd t1, 8(t0)
  li t0, 0x80102000
  li t1, (0x80103 << 10) | 0x43
  sd t1, 0(t0)
  li t1, (0x80104 << 10) | 0x17
  sd t1, 8(t0)
  li t1, (0x80103 << 10) | 0xC7
  sd t1, 16(t0)
  li t0, (8 << 60) | 0x80100
  csrw satp, t0
  sfence.vma

"""

@Suite(.enabled(if: RVAsm.available, Comment(rawValue: RVAsm.skipMessage)))
struct RISCVPrivilegeTests {
    @Test func csrMasksAndWARL() throws {
        let (m, exit) = try RVAsm.run("""
          li t0, -1
          csrw sstatus, t0
          csrr s2, sstatus
          csrw sstatus, zero
          csrw sie, t0
          csrr s3, sie
          csrw sip, t0
          csrr s4, sip
          csrw sip, zero
          li t1, 0x80001003
          csrw stvec, t1
          csrr s5, stvec
          li t2, 0x80100000
          li t1, 0x200000CF
          sd t1, 16(t2)
          li t1, (0x80100 << 10) | 1
          sd t1, 0(t2)
          li t1, (10 << 60) | 0x80100
          csrw satp, t1
          csrr s6, satp
          li t1, (9 << 60) | (0xffff << 44) | 0x80100
          csrw satp, t1
          csrr s7, satp
          csrw satp, zero
          li t1, (8 << 60) | 0x80100
          csrw satp, t1
          csrr s8, satp
          csrw satp, zero
          csrwi sscratch, 17
          csrrw a2, sscratch, t0
          csrr a3, sscratch
          li t1, 0x80001001
          csrw sepc, t1
          csrr a4, sepc
          la t6, _default_trap
          csrw stvec, t6
        """)
        #expect(exit == .shutdown)
        #expect(m.x(RVReg.s2) == 0x8000_0002_000C_6122, "sstatus: SIE SPIE SPP FS SUM MXR, UXL=2, SD")
        #expect(m.x(RVReg.s3) == 0x222)
        #expect(m.x(RVReg.s4) == 0x2, "only SSIP is writable")
        #expect(m.x(RVReg.s5) == 0x8000_1000, "reserved stvec mode reads as direct")
        #expect(m.x(RVReg.s6) == 0, "Sv57 is not supported: satp unchanged")
        #expect(m.x(RVReg.s7) == UInt64(9) << 60 | 0x80100, "Sv48 accepted, no ASID bits")
        #expect(m.x(RVReg.s8) == UInt64(8) << 60 | 0x80100)
        #expect(m.x(RVReg.a2) == 17 && m.x(RVReg.a3) == .max)
        #expect(m.x(RVReg.a4) == 0x8000_1000)
    }

    @Test(arguments: [
        ("csrr t0, mstatus", UInt64(0x3000_22f3)),
        ("csrw mtvec, t0", 0x3052_9073),
        ("mret", 0x3020_0073),
        ("csrw cycle, t0", 0xC002_9073),
        ("csrr t0, 0x7c0", 0x7c00_22f3),
        (".word 0xffffffff", 0xffff_ffff),
    ])
    func illegalInstructionsTrapWithTheirBits(_ insn: String, _ bits: UInt64) throws {
        let (m, exit) = try RVAsm.run(insn)
        #expect(exit == .shutdown)
        #expect(m.x(RVReg.s10) == 2)
        #expect(m.x(RVReg.s11) == bits)
    }

    @Test func compressedIllegalReportsSixteenBits() throws {
        let (m, _) = try RVAsm.run(".half 0x0000\n.half 0x0001")
        #expect(m.x(RVReg.s10) == 2 && m.x(RVReg.s11) == 0)
    }

    @Test func userModeReadsTimeByDefault() throws {
        let (m, exit) = try RVAsm.run(resumingHandler + """
          csrr s2, scounteren
          la t0, user
          csrw sepc, t0
          li t0, 0x100
          csrc sstatus, t0
          sret
        user:
          rdtime s3
          rdcycle s4
          li s0, 0x5e
          ecall
        """)
        #expect(exit == .shutdown)
        #expect(m.x(RVReg.s2) == 2, "scounteren.TM is set at reset (the vDSO reads time)")
        #expect(m.x(RVReg.s3) > 0)
        #expect(m.x(RVReg.s8) == 1 && m.x(RVReg.s10) == 2, "rdcycle stays denied (CY clear)")
    }

    @Test func userModeEcallCountersAndPrivilegedInstructions() throws {
        let (m, exit) = try RVAsm.run(resumingHandler + """
          csrwi scounteren, 2
          la t0, user
          csrw sepc, t0
          li t0, 0x100
          csrc sstatus, t0
          sret
        user:
          ecall
          mv a2, s10
          csrr a3, sstatus
          mv a4, s10
          li s10, 0
          rdtime a5
          mv s2, s10
          rdcycle s3
          mv s4, s10
          sret
          mv s5, s10
          wfi
          mv s6, s10
          sfence.vma
          mv t2, s10
          ebreak
          mv t3, s10
          li s0, 0x5e
          ecall
        """)
        #expect(exit == .shutdown)
        #expect(m.x(RVReg.a2) == 8, "ecall from U")
        #expect(m.x(RVReg.a4) == 2, "sstatus from U is illegal")
        #expect(m.x(RVReg.s2) == 0, "time allowed by scounteren.TM")
        #expect(m.x(RVReg.s4) == 2, "cycle denied by scounteren.CY")
        #expect(m.x(RVReg.s5) == 2 && m.x(RVReg.s6) == 2 && m.x(RVReg.t2) == 2, "sret, wfi, sfence.vma from U are illegal")
        #expect(m.x(RVReg.t3) == 3, "ebreak")
    }

    @Test func pageFaultsReportCauseAndAddress() throws {
        let (m, exit) = try RVAsm.run(resumingHandler + pageTables + """
          li a2, 0x40000000
          ld s2, 0(a2)
          mv s3, s10
          sd s2, 0(a2)
          mv s4, s10
          mv s5, s11
          li a3, 0x50000000
          lw t0, 0(a3)
          mv s6, s10
          mv s7, s11
          li a4, 0x40001000
          lw t0, 0(a4)
          mv t2, s10
          li t0, 0x40000
          csrs sstatus, t0
          li t1, 77
          sd t1, 8(a4)
          csrc sstatus, t0
          li t3, 0x80102008
          ld t3, 0(t3)
          li a5, 0x40002000
          la ra, 1f
          jr a5
        1:
          mv t4, s10
          mv t5, s11
          li a5, 0x40200000
          lw t0, 0(a5)
          mv a3, s10
          li a7, 0x8000000000
          lw t0, 0(a7)
          mv a0, s10
          csrw satp, zero
          li t0, 0x80104008
          ld a1, 0(t0)
          mv s0, a0
          mv s1, a1
        """)
        #expect(exit == .shutdown)
        #expect(m.x(RVReg.s3) == 0, "read-only page is readable")
        #expect(m.x(RVReg.s4) == 15 && m.x(RVReg.s5) == 0x4000_0000, "store to a read-only page")
        #expect(m.x(RVReg.s6) == 13 && m.x(RVReg.s7) == 0x5000_0000, "unmapped load")
        #expect(m.x(RVReg.t2) == 13, "S-mode load from a U page without SUM")
        #expect(m.x(28) & 0xC0 == 0xC0, "hardware set A and D on the U page (pte=0x\(String(m.x(28), radix: 16)))")
        #expect(m.x(29) == 12 && m.x(30) == 0x4000_2000, "fetch from a non-executable page")
        #expect(m.x(RVReg.a3) == 13, "misaligned superpage")
        #expect(m.x(RVReg.s0) == 13, "address not sign-extended from bit 38")
        #expect(m.x(RVReg.s1) == 77, "the SUM store landed")
        #expect(m.x(RVReg.s8) == 6)
    }

    @Test func mxrAndSupervisorFetchFromUserPages() throws {
        let (m, exit) = try RVAsm.run(resumingHandler + pageTables + """
          li t0, 0x80102000
          li t1, (0x80103 << 10) | 0x49
          sd t1, 24(t0)
          li t1, (0x80103 << 10) | 0x5B
          sd t1, 32(t0)
          sfence.vma
          li a2, 0x40003000
          ld t0, 0(a2)
          mv s2, s10
          li s10, 0
          li t1, 0x80000
          csrs sstatus, t1
          ld s3, 0(a2)
          mv s4, s10
          csrc sstatus, t1
          ld t0, 0(a2)
          mv a4, s10
          li t1, 0x40000
          csrs sstatus, t1
          li a3, 0x40004000
          la ra, 1f
          jr a3
        1:
          mv s5, s10
          mv a5, s11
        """)
        #expect(exit == .shutdown)
        #expect(m.x(RVReg.s2) == 13, "load from an execute-only page")
        #expect(m.x(RVReg.s4) == 0, "allowed with MXR")
        #expect(m.x(RVReg.a4) == 13, "clearing MXR takes effect (the TLB was emptied)")
        #expect(m.x(RVReg.s5) == 12 && m.x(RVReg.a5) == 0x4000_4000, "S-mode never executes U pages, even with SUM")
    }

    @Test func sv48TranslatesWithFourLevels() throws {
        let (m, exit) = try RVAsm.run("""
          li t0, 0x80100000
          li t1, (0x80101 << 10) | 1
          sd t1, 0(t0)
          li t0, 0x80101000
          li t1, 0x200000CF
          sd t1, 16(t0)
          li t0, (9 << 60) | 0x80100
          csrw satp, t0
          sfence.vma
          la t1, 1f
          ld s2, 0(t1)
          j 2f
        .balign 8
        1: .dword 0x1234
        2:
        """)
        #expect(exit == .shutdown)
        #expect(m.x(RVReg.s2) == 0x1234)
    }

    @Test func misalignedAccessesAreEmulated() throws {
        let (m, exit) = try RVAsm.run(resumingHandler + """
          la a2, buf
          li t0, 0x1122334455667788
          sd t0, 1(a2)
          ld s2, 1(a2)
          lw s3, 3(a2)
          lhu s4, 7(a2)
          li a3, 0x80200ffd
          sd t0, 0(a3)
          ld s5, 0(a3)
          lw s6, 2(a3)
          li t1, 0x10000001
          sw t0, 0(t1)
          j 1f
        .balign 8
        buf: .dword 0, 0
        1:
        """)
        #expect(exit == .shutdown)
        #expect(m.x(RVReg.s8) == 0, "no traps")
        #expect(m.x(RVReg.s2) == 0x1122_3344_5566_7788)
        #expect(m.x(RVReg.s3) == 0x3344_5566)
        #expect(m.x(RVReg.s4) == 0x1122)
        #expect(m.x(RVReg.s5) == 0x1122_3344_5566_7788, "across a page boundary")
        #expect(m.x(RVReg.s6) == 0x3344_5566)
        #expect(m.device.lastWrite?.offset == 1 && m.device.lastWrite?.size == 4)
    }

    @Test func accessFaultOutsideRAMAndDevices() throws {
        let (m, _) = try RVAsm.run("""
          li t0, 0x20000000
          ld t1, 0(t0)
        """)
        #expect(m.x(RVReg.s10) == 5 && m.x(RVReg.s11) == 0x2000_0000)
    }

    @Test func interruptPriorityAndGating() throws {
        let (m, exit) = try RVAsm.run(resumingHandler + """
          li t0, 0x222
          csrw sie, t0
          csrsi sip, 2
          li a0, 0
          SBI 0x54494D45, 0
          nop
          nop
          mv s2, s6
          csrsi sstatus, 2
          nop
          nop
          csrci sstatus, 2
          mv s3, s6
          li a0, -1
          SBI 0x54494D45, 0
          li a0, 1
          li a1, 0
          SBI 0x735049, 0
          csrr s4, sip
        """) { m in
            m.hart.supervisorExternalInterrupt.set(true)
        }
        #expect(exit == .shutdown)
        #expect(m.x(RVReg.s2) == 0, "SIE=0 in S-mode masks interrupts")
        #expect(m.x(RVReg.s3) == 0x09_01_05, "SEI, then SSI, then STI (got 0x\(String(m.x(RVReg.s3), radix: 16)))")
        #expect(m.x(RVReg.s4) & 0x222 == 0x202, "SBI IPI sets SSIP; set_timer(-1) clears STIP; SEIP follows the line")
    }

    @Test func softwareBeforeTimerAndVectoredMode() throws {
        let (m, exit) = try RVAsm.run("""
          la t0, vec
          ori t0, t0, 1
          csrw stvec, t0
          li t0, 0x22
          csrw sie, t0
          csrsi sip, 2
          li a0, 0
          SBI 0x54494D45, 0
          csrsi sstatus, 2
          nop
          j done
        .balign 64
        vec:
          j bad
          j ssi
          j bad
          j bad
          j bad
          j sti
          j bad
        bad:
          li s2, 99
          j done
        ssi:
          addi s3, s3, 1
          csrr s4, scause
          csrci sip, 2
          sret
        sti:
          csrr s5, scause
          li a0, -1
          SBI 0x54494D45, 0
          sret
        done:
        """)
        #expect(exit == .shutdown)
        #expect(m.x(RVReg.s2) == 0)
        #expect(m.x(RVReg.s3) == 1)
        #expect(m.x(RVReg.s4) == UInt64(1) << 63 | 1)
        #expect(m.x(RVReg.s5) == UInt64(1) << 63 | 5)
    }

    @Test func userModeTakesInterruptsWhateverSIE() throws {
        let (m, exit) = try RVAsm.run(resumingHandler + """
          li t0, 0x2
          csrw sie, t0
          csrsi sip, 2
          nop
          mv s2, s6
          la t0, user
          csrw sepc, t0
          li t0, 0x122
          csrc sstatus, t0
          sret
        user:
          mv s3, s6
          ecall
          mv s4, s10
          li s0, 0x5e
          ecall
        """)
        #expect(exit == .shutdown)
        #expect(m.x(RVReg.s2) == 0, "masked in S-mode with SIE=0")
        #expect(m.x(RVReg.s3) == 1, "taken in U-mode with SIE=0: s6=\(m.x(RVReg.s6)) s8=\(m.x(RVReg.s8)) s10=\(m.x(RVReg.s10)) s9=\(String(m.x(RVReg.s9), radix: 16)) sip=\(m.csr(0x144)) sie=\(m.csr(0x104))")
        #expect(m.x(RVReg.s4) == 8)
    }

    @Test func wfiWakesOnTimer() throws {
        let (m, exit) = try RVAsm.run("""
          li t0, 0x20
          csrw sie, t0
          rdtime s2
          li t1, 200000
          add a0, s2, t1
          SBI 0x54494D45, 0
          wfi
          rdtime s3
          csrr s4, sip
        """)
        #expect(exit == .shutdown)
        let elapsed = m.x(RVReg.s3) &- m.x(RVReg.s2)
        #expect(elapsed >= 200_000 && elapsed < 20_000_000, "woke after \(elapsed) ticks")
        #expect(m.x(RVReg.s4) & 0x20 != 0)
    }

    @Test func wfiWakesOnTheExternalLine() throws {
        let m = try RVAsm.machine("""
          li t0, 0x200
          csrw sie, t0
          rdtime s2
          wfi
          rdtime s3
          csrr s4, sip
        """)
        let line = m.hart.supervisorExternalInterrupt
        rvAfter(0.1) { line.set(true) }
        let exit = RVAsm.runWithWatchdog(m.hart, seconds: 10)
        #expect(exit == .shutdown)
        let elapsed = m.x(RVReg.s3) &- m.x(RVReg.s2)
        #expect(elapsed >= 500_000 && elapsed < 50_000_000, "woke after \(elapsed) ticks")
        #expect(m.x(RVReg.s4) & 0x200 != 0)
    }

    @Test func requestStopWakesWFI() throws {
        let m = try RVAsm.machine("""
          csrw sie, zero
          wfi
        """)
        let hart = m.hart
        rvAfter(0.1) { hart.requestStop() }
        let start = Date()
        #expect(RVAsm.runWithWatchdog(hart, seconds: 10) == .stopped)
        #expect(Date().timeIntervalSince(start) < 5)
    }

    @Test func resetAndCrashExits() throws {
        let (_, reset) = try RVAsm.run("""
          li a0, 1
          li a1, 0
          SBI 0x53525354, 0
        """)
        #expect(reset == .reset)
        let (_, crash) = try RVAsm.run("""
          csrw stvec, zero
          .word 0x1234567b
        """)
        guard case .crashed(let message) = crash else {
            Issue.record("expected a crash, got \(crash)")
            return
        }
        #expect(message.contains("insn=0x1234567b") && message.contains("pc=0x800000"), "\(message)")
    }

    @Test func selfModifyingCodeAndDMAInvalidation() throws {
        let m = try RVAsm.machine("""
          la t0, patch
          li t1, 0x00700913
          sw t1, 0(t0)
          fence.i
        patch:
          li s2, 1
          la t2, func
          jalr t2
          mv s3, a5
          EXIT
        .balign 4096
        func:
          li a5, 1
          ret
        """)
        #expect(RVAsm.runWithWatchdog(m.hart, seconds: 10) == .shutdown)
        #expect(m.x(RVReg.s2) == 7, "the patched instruction ran")
        #expect(m.x(RVReg.s3) == 1)
        // "DMA" over func: return 2 instead, then run again from the start.
        let funcAddress = RVAsm.ramBase + 4096
        var insn: UInt32 = 0x0020_0793  // li a5, 2
        try withUnsafeBytes(of: &insn) { try m.ram.write($0, at: funcAddress) }
        m.hart.invalidateCode(physicalAddress: funcAddress, length: 4)
        m.hart.pc = RVAsm.ramBase
        #expect(RVAsm.runWithWatchdog(m.hart, seconds: 10) == .shutdown)
        #expect(m.x(RVReg.s3) == 2, "decoded code for the DMA'd page was dropped")
    }

    /// A page emptied by a store and decoded again in the same block is watched again: a
    /// second store to it (through the store TLB entry the first one left) must still drop
    /// the instruction decoded in between, so that after fence.i the new one runs.
    @Test func codeDecodedAfterAnInvalidationIsWatchedAgain() throws {
        let (m, exit) = try RVAsm.run("""
          li s4, 0
          la t0, patch
          li t1, 0x00500913
          sw t1, 0(t0)
        patch:
          li s2, 1
          bnez s4, done
          li s4, 1
          li t1, 0x00700913
          sw t1, 0(t0)
          fence.i
          j patch
        done:
          mv s3, s2
        """)
        #expect(exit == .shutdown)
        #expect(m.x(RVReg.s3) == 7, "the instruction patched a second time ran (li s2, 7)")
    }

    @Test func instretCountsRetiredInstructions() throws {
        let (m, exit) = try RVAsm.run("""
          li s2, 0
          li s4, 100
        1:
          addi s2, s2, 1
          bne s2, s4, 1b
          rdinstret s3
        """)
        #expect(exit == .shutdown)
        #expect(m.x(RVReg.s2) == 100)
        #expect(m.x(RVReg.s3) > 200 && m.x(RVReg.s3) < 260)
    }
}
