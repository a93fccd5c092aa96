// RV64 I, M, A and C semantics, run as small programs on RISCVHart.
import Foundation
import Testing
@testable import QMachine

@Suite(.enabled(if: RVAsm.available, Comment(rawValue: RVAsm.skipMessage)))
struct RISCVIntegerTests {
    struct Case: CustomStringConvertible, Sendable {
        let op: String, a: UInt64, b: UInt64, result: UInt64
        var description: String { "\(op) 0x\(String(a, radix: 16)), 0x\(String(b, radix: 16))" }
    }

    static let minI: UInt64 = 0x8000_0000_0000_0000
    static let allOnes = UInt64.max
    static let arithmetic: [Case] = [
        Case(op: "div", a: 7, b: 0, result: allOnes),
        Case(op: "div", a: minI, b: allOnes, result: minI),
        Case(op: "div", a: UInt64(bitPattern: -7), b: 2, result: UInt64(bitPattern: -3)),
        Case(op: "divu", a: 7, b: 0, result: allOnes),
        Case(op: "rem", a: 7, b: 0, result: 7),
        Case(op: "rem", a: minI, b: allOnes, result: 0),
        Case(op: "rem", a: UInt64(bitPattern: -7), b: 2, result: allOnes),
        Case(op: "remu", a: 7, b: 0, result: 7),
        Case(op: "divw", a: 0x8000_0000, b: allOnes, result: 0xFFFF_FFFF_8000_0000),
        Case(op: "divw", a: 5, b: 0, result: allOnes),
        Case(op: "divuw", a: 5, b: 0, result: allOnes),
        Case(op: "divuw", a: 0xFFFF_FFFF_FFFF_FFFE, b: 2, result: 0x7FFF_FFFF),
        Case(op: "remw", a: 0x8000_0000, b: allOnes, result: 0),
        Case(op: "remw", a: 0x1_0000_0005, b: 0, result: 5),
        Case(op: "remuw", a: 0xFFFF_FFFF, b: 0, result: allOnes),
        Case(op: "mul", a: minI, b: allOnes, result: minI),
        Case(op: "mulh", a: allOnes, b: allOnes, result: 0),
        Case(op: "mulh", a: minI, b: minI, result: 0x4000_0000_0000_0000),
        Case(op: "mulhu", a: allOnes, b: allOnes, result: allOnes - 1),
        Case(op: "mulhsu", a: allOnes, b: allOnes, result: allOnes),
        Case(op: "mulhsu", a: 2, b: allOnes, result: 1),
        Case(op: "mulw", a: 0x1_0000_0001, b: 0x8000_0000, result: 0xFFFF_FFFF_8000_0000),
        Case(op: "addw", a: 0x7FFF_FFFF, b: 1, result: 0xFFFF_FFFF_8000_0000),
        Case(op: "subw", a: 0, b: 0x8000_0000, result: 0xFFFF_FFFF_8000_0000),
        Case(op: "sllw", a: 1, b: 31, result: 0xFFFF_FFFF_8000_0000),
        Case(op: "sllw", a: 1, b: 32, result: 1),
        Case(op: "srlw", a: 0xFFFF_FFFF_8000_0000, b: 31, result: 1),
        Case(op: "sraw", a: 0x8000_0000, b: 4, result: 0xFFFF_FFFF_F800_0000),
        Case(op: "sll", a: 1, b: 64, result: 1),
        Case(op: "sra", a: minI, b: 63, result: allOnes),
        Case(op: "srl", a: minI, b: 63, result: 1),
        Case(op: "slt", a: allOnes, b: 0, result: 1),
        Case(op: "sltu", a: allOnes, b: 0, result: 0),
    ]

    @Test(arguments: arithmetic) func arithmeticEdgeCases(_ c: Case) throws {
        let (m, exit) = try RVAsm.run("""
          li t0, \(c.a)
          li t1, \(c.b)
          \(c.op) s2, t0, t1
        """)
        #expect(exit == .shutdown)
        #expect(m.x(s2) == c.result, "\(c) = 0x\(String(m.x(s2), radix: 16))")
    }

    @Test func immediatesAndSignExtension() throws {
        let (m, exit) = try RVAsm.run("""
          li t0, 0x7fffffff
          addiw s2, t0, 1
          slliw s3, t0, 1
          li t1, -1
          srliw s4, t1, 28
          sraiw s5, t1, 31
          lui s6, 0x80000
          auipc s7, 0
          li t2, 0x12345678
          la t3, buf
          sw t2, 0(t3)
          lb s8, 3(t3)
          lbu s10, 0(t3)
          li t4, -1
          sw t4, 4(t3)
          lwu s11, 4(t3)
          lw t5, 4(t3)
          lh t6, 4(t3)
          slti a2, t4, 0
          sltiu a3, t4, -1
          j 1f
        .balign 8
        buf: .dword 0, 0
        1:
        """)
        #expect(exit == .shutdown)
        #expect(m.x(s2) == 0xFFFF_FFFF_8000_0000)
        #expect(m.x(s3) == 0xFFFF_FFFF_FFFF_FFFE)
        #expect(m.x(s4) == 0xF)
        #expect(m.x(s5) == .max)
        #expect(m.x(s6) == 0xFFFF_FFFF_8000_0000)
        #expect(m.x(s7) > RVAsm.ramBase)
        #expect(m.x(s8) == 0x12)
        #expect(m.x(s10) == 0x78)
        #expect(m.x(s11) == 0xFFFF_FFFF)
        #expect(m.x(t5) == .max)
        #expect(m.x(31) == .max)
        #expect(m.x(a2) == 1)
        #expect(m.x(a3) == 0)
    }

    /// Every RV64C form decodes to exactly what its 32-bit expansion decodes to.
    static let compressedPairs: [(String, String)] = [
        ("c.addi4spn a0, sp, 16", "addi a0, sp, 16"),
        ("c.addi4spn s1, sp, 1020", "addi s1, sp, 1020"),
        ("c.fld fa0, 8(a1)", "fld fa0, 8(a1)"),
        ("c.fld fs1, 248(s0)", "fld fs1, 248(s0)"),
        ("c.lw a0, 4(a1)", "lw a0, 4(a1)"),
        ("c.lw a5, 124(a4)", "lw a5, 124(a4)"),
        ("c.ld a0, 8(a1)", "ld a0, 8(a1)"),
        ("c.ld a2, 248(a3)", "ld a2, 248(a3)"),
        ("c.fsd fa0, 8(a1)", "fsd fa0, 8(a1)"),
        ("c.sw a0, 124(a1)", "sw a0, 124(a1)"),
        ("c.sd a0, 248(a1)", "sd a0, 248(a1)"),
        ("c.nop", "addi zero, zero, 0"),
        ("c.addi a0, -3", "addi a0, a0, -3"),
        ("c.addi t1, 31", "addi t1, t1, 31"),
        ("c.addiw a0, -32", "addiw a0, a0, -32"),
        ("c.li a0, -7", "addi a0, zero, -7"),
        ("c.addi16sp sp, -64", "addi sp, sp, -64"),
        ("c.addi16sp sp, 496", "addi sp, sp, 496"),
        ("c.lui a0, 0xfffe1", "lui a0, 0xfffe1"),
        ("c.lui t3, 31", "lui t3, 31"),
        ("c.srli a0, 3", "srli a0, a0, 3"),
        ("c.srli a1, 63", "srli a1, a1, 63"),
        ("c.srai a0, 33", "srai a0, a0, 33"),
        ("c.andi a0, -2", "andi a0, a0, -2"),
        ("c.sub s0, a5", "sub s0, s0, a5"),
        ("c.xor a0, a1", "xor a0, a0, a1"),
        ("c.or a0, a1", "or a0, a0, a1"),
        ("c.and a0, a1", "and a0, a0, a1"),
        ("c.subw a0, a1", "subw a0, a0, a1"),
        ("c.addw a0, a1", "addw a0, a0, a1"),
        ("c.j .+1026", "jal zero, .+1026"),
        ("c.j .-2048", "jal zero, .-2048"),
        ("c.beqz a0, .+254", "beq a0, zero, .+254"),
        ("c.bnez s1, .-256", "bne s1, zero, .-256"),
        ("c.slli a0, 63", "slli a0, a0, 63"),
        ("c.fldsp ft1, 504(sp)", "fld ft1, 504(sp)"),
        ("c.lwsp t0, 252(sp)", "lw t0, 252(sp)"),
        ("c.ldsp t0, 504(sp)", "ld t0, 504(sp)"),
        ("c.jr a0", "jalr zero, 0(a0)"),
        ("c.mv a0, t2", "add a0, zero, t2"),
        ("c.ebreak", "ebreak"),
        ("c.jalr t0", "jalr ra, 0(t0)"),
        ("c.add a0, a1", "add a0, a0, a1"),
        ("c.fsdsp ft3, 504(sp)", "fsd ft3, 504(sp)"),
        ("c.swsp t0, 252(sp)", "sw t0, 252(sp)"),
        ("c.sdsp t0, 504(sp)", "sd t0, 504(sp)"),
    ]

    @Test func compressedFormsDecodeLikeTheirExpansions() throws {
        // Each pair assembles to 2 + 4 bytes; the first 16 bytes of the prelude are skipped
        // by locating a marker.
        var source = "  .word 0x0badc0de\n"
        for (c, full) in RISCVIntegerTests.compressedPairs {
            source += "  .option rvc\n  \(c)\n  .option norvc\n  \(full)\n"
        }
        let bytes = try RVAsm.assemble(source)
        let marker: [UInt8] = [0xde, 0xc0, 0xad, 0x0b]
        var start = 0
        while Array(bytes[start..<start + 4]) != marker { start += 2 }
        var at = start + 4
        for (c, full) in RISCVIntegerTests.compressedPairs {
            let half = UInt32(bytes[at]) | UInt32(bytes[at + 1]) << 8
            let word = UInt32(bytes[at + 2]) | UInt32(bytes[at + 3]) << 8 | UInt32(bytes[at + 4]) << 16 | UInt32(bytes[at + 5]) << 24
            at += 6
            #expect(half & 3 != 3, "\(c) was not compressed")
            let dc = RISCVDecoder.decodeCompressed(half), dw = RISCVDecoder.decode(word)
            #expect(dc.op == dw.op && dc.rd == dw.rd && dc.rs1 == dw.rs1 && dc.rs2 == dw.rs2 && dc.imm == dw.imm,
                    "\(c): \(dc.op) rd=\(dc.rd) rs1=\(dc.rs1) rs2=\(dc.rs2) imm=\(dc.imm) vs \(full): \(dw.op) rd=\(dw.rd) rs1=\(dw.rs1) rs2=\(dw.rs2) imm=\(dw.imm)")
            #expect(dc.length == 2 && dw.length == 4)
        }
        // Reserved encodings are illegal.
        #expect(RISCVDecoder.decodeCompressed(0x0000).op == .illegal)  // all zeros
        #expect(RISCVDecoder.decodeCompressed(0x6101 & ~0x107c).op == .illegal)  // c.addi16sp 0
        #expect(RISCVDecoder.decodeCompressed(0x2001).op == .illegal)  // c.addiw x0
        #expect(RISCVDecoder.decodeCompressed(0x4002).op == .illegal)  // c.lwsp x0
        #expect(RISCVDecoder.decodeCompressed(0x8002).op == .illegal)  // c.jr x0
    }

    @Test func compressedProgramRuns() throws {
        let (m, exit) = try RVAsm.run("""
          .option rvc
          c.li s0, 5
          c.addi s0, 3
          c.slli s0, 2
          c.mv a5, s0
          c.li a2, 1
          c.sub a5, a2
          c.addiw a5, -1
          la a3, 2f
          c.jalr a3
          c.mv s3, a0
          j 3f
        2:
          c.li a0, 9
          c.jr ra
        3:
          addi sp, sp, -16
          c.sdsp s0, 8(sp)
          c.ldsp s2, 8(sp)
          c.li a4, 0
          c.beqz a4, 4f
          c.li s2, 0
        4:
          .option norvc
        """)
        #expect(exit == .shutdown)
        #expect(m.x(s0) == 32)
        #expect(m.x(a5) == 30)
        #expect(m.x(s3) == 9)
        #expect(m.x(s2) == 32)
    }

    @Test func loadReservedStoreConditionalAndAMOs() throws {
        let (m, exit) = try RVAsm.run("""
          la a0, data
          lr.d t0, (a0)
          addi t0, t0, 1
          sc.d s2, t0, (a0)
          sc.d s3, t0, (a0)
          ld s4, 0(a0)
          lr.w t1, (a0)
          sw zero, 8(a0)
          sc.w s5, t1, (a0)
          li t2, -1
          addi a1, a0, 8
          amoadd.w s6, t2, (a1)
          lw s7, 8(a0)
          li t2, 5
          amoswap.d s8, t2, (a0)
          li t3, -3
          amomax.d s10, t3, (a0)
          amomaxu.d s11, t3, (a0)
          ld t4, 0(a0)
          li t5, 0x80000000
          sw t5, 16(a0)
          addi a1, a0, 16
          amominu.w a5, zero, (a1)
          lw a4, 16(a0)
          j 1f
        .balign 8
        data: .dword 41, 0, 0
        1:
        """)
        #expect(exit == .shutdown)
        #expect(m.x(s2) == 0, "sc after lr succeeds")
        #expect(m.x(s3) == 1, "a second sc fails")
        #expect(m.x(s4) == 42)
        #expect(m.x(s5) == 0, "a store elsewhere keeps the reservation")
        #expect(m.x(s6) == 0)
        #expect(m.x(s7) == .max, "amoadd.w wraps and sign-extends")
        #expect(m.x(s8) == 42)
        #expect(m.x(s10) == 5)
        #expect(m.x(s11) == 5)
        #expect(m.x(29) == UInt64(bitPattern: -3))
        #expect(m.x(a5) == 0xFFFF_FFFF_8000_0000, "amo*.w returns the sign-extended old word")
        #expect(m.x(a4) == 0)
    }

    @Test func misalignedAMOTraps() throws {
        let (m, exit) = try RVAsm.run("""
          la a0, data
          addi a0, a0, 2
          amoadd.w t0, t0, (a0)
          j 1f
        .balign 8
        data: .dword 0
        1:
        """)
        #expect(exit == .shutdown)
        #expect(m.x(s10) == 6)
        #expect(m.x(s11) & 3 == 2, "stval is the misaligned address")
    }
}
