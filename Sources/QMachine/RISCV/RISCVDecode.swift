/// Decoders from instruction words to ``DecodedInstruction`` (unprivileged spec, chapters
/// "RV32I/RV64I Base Integer Instruction Set", "M", "A", "F", "D", "C", "Zicsr", "Zifencei";
/// privileged spec for SYSTEM instructions). Field checks that depend on run-time state (FP
/// rounding modes, CSR numbers) are left to the interpreter.
enum RISCVDecoder {
    @inline(__always) static func immI(_ r: UInt32) -> Int32 { Int32(bitPattern: r) >> 20 }
    @inline(__always) static func immS(_ r: UInt32) -> Int32 {
        ((Int32(bitPattern: r) >> 25) << 5) | Int32((r >> 7) & 0x1f)
    }
    @inline(__always) static func immB(_ r: UInt32) -> Int32 {
        let s = (Int32(bitPattern: r) >> 31) << 12
        return s | Int32((r >> 7) & 1) << 11 | Int32((r >> 25) & 0x3f) << 5 | Int32((r >> 8) & 0xf) << 1
    }
    @inline(__always) static func immJ(_ r: UInt32) -> Int32 {
        let s = (Int32(bitPattern: r) >> 31) << 20
        return s | Int32((r >> 12) & 0xff) << 12 | Int32((r >> 20) & 1) << 11 | Int32((r >> 21) & 0x3ff) << 1
    }

    /// Decodes a 32-bit instruction; register fields an operation does not use are zero.
    static func decode(_ r: UInt32) -> DecodedInstruction {
        var d = decodeFields(r)
        switch d.op {
        case .lui, .auipc, .jal:
            d.rs1 = 0; d.rs2 = 0
        case .jalr, .lb, .lh, .lw, .ld, .lbu, .lhu, .lwu, .addi, .slti, .sltiu, .xori, .ori, .andi,
             .slli, .srli, .srai, .addiw, .slliw, .srliw, .sraiw, .flw, .fld:
            d.rs2 = 0
        case .beq, .bne, .blt, .bge, .bltu, .bgeu, .sb, .sh, .sw, .sd, .fsw, .fsd:
            d.rd = 0
        case .ebreak, .ecall, .sret, .wfi, .illegal:
            d.rd = 0; d.rs1 = 0; d.rs2 = 0
        default:
            break
        }
        return d
    }

    private static func decodeFields(_ r: UInt32) -> DecodedInstruction {
        let rd = (r >> 7) & 31, rs1 = (r >> 15) & 31, rs2 = (r >> 20) & 31
        let f3 = (r >> 12) & 7, f7 = r >> 25
        let illegal = DecodedInstruction(.illegal, raw: r)
        func make(_ op: Op, _ imm: Int32 = 0) -> DecodedInstruction {
            DecodedInstruction(op, rd: rd, rs1: rs1, rs2: rs2, imm: imm, raw: r)
        }
        switch r & 0x7f {
        case 0x37: return make(.lui, Int32(bitPattern: r & 0xffff_f000))
        case 0x17: return make(.auipc, Int32(bitPattern: r & 0xffff_f000))
        case 0x6f: return make(.jal, immJ(r))
        case 0x67: return f3 == 0 ? make(.jalr, immI(r)) : illegal
        case 0x63:
            let ops: [Op?] = [.beq, .bne, nil, nil, .blt, .bge, .bltu, .bgeu]
            guard let op = ops[Int(f3)] else { return illegal }
            return make(op, immB(r))
        case 0x03:
            let ops: [Op?] = [.lb, .lh, .lw, .ld, .lbu, .lhu, .lwu, nil]
            guard let op = ops[Int(f3)] else { return illegal }
            return make(op, immI(r))
        case 0x23:
            let ops: [Op?] = [.sb, .sh, .sw, .sd, nil, nil, nil, nil]
            guard let op = ops[Int(f3)] else { return illegal }
            return make(op, immS(r))
        case 0x13:
            switch f3 {
            case 0: return make(.addi, immI(r))
            case 2: return make(.slti, immI(r))
            case 3: return make(.sltiu, immI(r))
            case 4: return make(.xori, immI(r))
            case 6: return make(.ori, immI(r))
            case 7: return make(.andi, immI(r))
            case 1: return r >> 26 == 0 ? make(.slli, Int32((r >> 20) & 63)) : illegal
            default:
                if r >> 26 == 0 { return make(.srli, Int32((r >> 20) & 63)) }
                if r >> 26 == 0x10 { return make(.srai, Int32((r >> 20) & 63)) }
                return illegal
            }
        case 0x1b:
            switch (f3, f7) {
            case (0, _): return make(.addiw, immI(r))
            case (1, 0): return make(.slliw, Int32(rs2))
            case (5, 0): return make(.srliw, Int32(rs2))
            case (5, 0x20): return make(.sraiw, Int32(rs2))
            default: return illegal
            }
        case 0x33:
            switch (f7, f3) {
            case (0, 0): return make(.add)
            case (0x20, 0): return make(.sub)
            case (0, 1): return make(.sll)
            case (0, 2): return make(.slt)
            case (0, 3): return make(.sltu)
            case (0, 4): return make(.xor)
            case (0, 5): return make(.srl)
            case (0x20, 5): return make(.sra)
            case (0, 6): return make(.or)
            case (0, 7): return make(.and)
            case (1, _):
                let ops: [Op] = [.mul, .mulh, .mulhsu, .mulhu, .div, .divu, .rem, .remu]
                return make(ops[Int(f3)])
            default: return illegal
            }
        case 0x3b:
            switch (f7, f3) {
            case (0, 0): return make(.addw)
            case (0x20, 0): return make(.subw)
            case (0, 1): return make(.sllw)
            case (0, 5): return make(.srlw)
            case (0x20, 5): return make(.sraw)
            case (1, 0): return make(.mulw)
            case (1, 4): return make(.divw)
            case (1, 5): return make(.divuw)
            case (1, 6): return make(.remw)
            case (1, 7): return make(.remuw)
            default: return illegal
            }
        case 0x0f:
            if f3 == 0 { return make(.fence) }
            if f3 == 1 { return make(.fencei) }
            return illegal
        case 0x73:
            if f3 == 0 {
                switch r {
                case 0x0000_0073: return make(.ecall)
                case 0x0010_0073: return make(.ebreak)
                case 0x1020_0073: return make(.sret)
                case 0x1050_0073: return make(.wfi)
                default:
                    if f7 == 0x09 && rd == 0 { return make(.sfencevma) }
                    return illegal
                }
            }
            if f3 == 4 { return illegal }
            return make(.csr, Int32(r >> 20))
        case 0x2f:
            guard f3 == 2 || f3 == 3 else { return illegal }
            switch r >> 27 {
            case 0x02: return rs2 == 0 ? make(.amo) : illegal
            case 0x03, 0x01, 0x00, 0x04, 0x0c, 0x08, 0x10, 0x14, 0x18, 0x1c: return make(.amo)
            default: return illegal
            }
        case 0x07:
            if f3 == 2 { return make(.flw, immI(r)) }
            if f3 == 3 { return make(.fld, immI(r)) }
            return illegal
        case 0x27:
            if f3 == 2 { return make(.fsw, immS(r)) }
            if f3 == 3 { return make(.fsd, immS(r)) }
            return illegal
        case 0x43, 0x47, 0x4b, 0x4f, 0x53:
            var d = make(.fp)
            d.rs3 = UInt8(r >> 27)
            return d
        default:
            return illegal
        }
    }

    /// Decodes a 16-bit (C extension, RV64) instruction to the operation of its expansion.
    static func decodeCompressed(_ c: UInt32) -> DecodedInstruction {
        let illegal = DecodedInstruction(.illegal, raw: c, length: 2)
        func make(_ op: Op, rd: UInt32 = 0, rs1: UInt32 = 0, rs2: UInt32 = 0, imm: Int32 = 0) -> DecodedInstruction {
            DecodedInstruction(op, rd: rd, rs1: rs1, rs2: rs2, imm: imm, raw: c, length: 2)
        }
        @inline(__always) func bit(_ n: UInt32) -> UInt32 { (c >> n) & 1 }
        @inline(__always) func bits(_ hi: UInt32, _ lo: UInt32) -> UInt32 { (c >> lo) & ((1 << (hi - lo + 1)) - 1) }
        @inline(__always) func sext(_ v: UInt32, _ width: UInt32) -> Int32 {
            Int32(bitPattern: v << (32 - width)) >> (32 - width)
        }
        let rdFull = bits(11, 7), rs2Full = bits(6, 2)
        let rdP = bits(4, 2) + 8, rs1P = bits(9, 7) + 8
        let f3 = bits(15, 13)
        switch (c & 3, f3) {
        // Quadrant 0
        case (0, 0):  // C.ADDI4SPN
            let imm = bits(12, 11) << 4 | bits(10, 7) << 6 | bit(6) << 2 | bit(5) << 3
            return imm == 0 ? illegal : make(.addi, rd: rdP, rs1: 2, imm: Int32(imm))
        case (0, 1):  // C.FLD
            return make(.fld, rd: rdP, rs1: rs1P, imm: Int32(bits(12, 10) << 3 | bits(6, 5) << 6))
        case (0, 2):  // C.LW
            return make(.lw, rd: rdP, rs1: rs1P, imm: Int32(bits(12, 10) << 3 | bit(6) << 2 | bit(5) << 6))
        case (0, 3):  // C.LD
            return make(.ld, rd: rdP, rs1: rs1P, imm: Int32(bits(12, 10) << 3 | bits(6, 5) << 6))
        case (0, 5):  // C.FSD
            return make(.fsd, rs1: rs1P, rs2: rdP, imm: Int32(bits(12, 10) << 3 | bits(6, 5) << 6))
        case (0, 6):  // C.SW
            return make(.sw, rs1: rs1P, rs2: rdP, imm: Int32(bits(12, 10) << 3 | bit(6) << 2 | bit(5) << 6))
        case (0, 7):  // C.SD
            return make(.sd, rs1: rs1P, rs2: rdP, imm: Int32(bits(12, 10) << 3 | bits(6, 5) << 6))
        // Quadrant 1
        case (1, 0):  // C.ADDI / C.NOP
            return make(.addi, rd: rdFull, rs1: rdFull, imm: sext(bit(12) << 5 | rs2Full, 6))
        case (1, 1):  // C.ADDIW
            return rdFull == 0 ? illegal : make(.addiw, rd: rdFull, rs1: rdFull, imm: sext(bit(12) << 5 | rs2Full, 6))
        case (1, 2):  // C.LI
            return make(.addi, rd: rdFull, rs1: 0, imm: sext(bit(12) << 5 | rs2Full, 6))
        case (1, 3):
            if rdFull == 2 {  // C.ADDI16SP
                let imm = bit(12) << 9 | bit(6) << 4 | bit(5) << 6 | bits(4, 3) << 7 | bit(2) << 5
                return imm == 0 ? illegal : make(.addi, rd: 2, rs1: 2, imm: sext(imm, 10))
            }
            let imm = bit(12) << 17 | rs2Full << 12  // C.LUI
            return imm == 0 ? illegal : make(.lui, rd: rdFull, imm: sext(imm, 18))
        case (1, 4):
            let shamt = Int32(bit(12) << 5 | rs2Full)
            switch bits(11, 10) {
            case 0: return make(.srli, rd: rs1P, rs1: rs1P, imm: shamt)
            case 1: return make(.srai, rd: rs1P, rs1: rs1P, imm: shamt)
            case 2: return make(.andi, rd: rs1P, rs1: rs1P, imm: sext(bit(12) << 5 | rs2Full, 6))
            default:
                let ops: [Op?] = bit(12) == 0 ? [.sub, .xor, .or, .and] : [.subw, .addw, nil, nil]
                guard let op = ops[Int(bits(6, 5))] else { return illegal }
                return make(op, rd: rs1P, rs1: rs1P, rs2: rdP)
            }
        case (1, 5):  // C.J
            let imm = bit(12) << 11 | bit(11) << 4 | bits(10, 9) << 8 | bit(8) << 10 | bit(7) << 6
                | bit(6) << 7 | bits(5, 3) << 1 | bit(2) << 5
            return make(.jal, rd: 0, imm: sext(imm, 12))
        case (1, 6), (1, 7):  // C.BEQZ, C.BNEZ
            let imm = bit(12) << 8 | bits(11, 10) << 3 | bits(6, 5) << 6 | bits(4, 3) << 1 | bit(2) << 5
            return make(f3 == 6 ? .beq : .bne, rs1: rs1P, rs2: 0, imm: sext(imm, 9))
        // Quadrant 2
        case (2, 0):  // C.SLLI
            return make(.slli, rd: rdFull, rs1: rdFull, imm: Int32(bit(12) << 5 | rs2Full))
        case (2, 1):  // C.FLDSP
            return make(.fld, rd: rdFull, rs1: 2, imm: Int32(bit(12) << 5 | bits(6, 5) << 3 | bits(4, 2) << 6))
        case (2, 2):  // C.LWSP
            return rdFull == 0 ? illegal : make(.lw, rd: rdFull, rs1: 2, imm: Int32(bit(12) << 5 | bits(6, 4) << 2 | bits(3, 2) << 6))
        case (2, 3):  // C.LDSP
            return rdFull == 0 ? illegal : make(.ld, rd: rdFull, rs1: 2, imm: Int32(bit(12) << 5 | bits(6, 5) << 3 | bits(4, 2) << 6))
        case (2, 4):
            if bit(12) == 0 {
                if rs2Full == 0 { return rdFull == 0 ? illegal : make(.jalr, rd: 0, rs1: rdFull) }  // C.JR
                return make(.add, rd: rdFull, rs1: 0, rs2: rs2Full)  // C.MV
            }
            if rs2Full == 0 {
                if rdFull == 0 { return make(.ebreak) }  // C.EBREAK
                return make(.jalr, rd: 1, rs1: rdFull)  // C.JALR
            }
            return make(.add, rd: rdFull, rs1: rdFull, rs2: rs2Full)  // C.ADD
        case (2, 5):  // C.FSDSP
            return make(.fsd, rs1: 2, rs2: rs2Full, imm: Int32(bits(12, 10) << 3 | bits(9, 7) << 6))
        case (2, 6):  // C.SWSP
            return make(.sw, rs1: 2, rs2: rs2Full, imm: Int32(bits(12, 9) << 2 | bits(8, 7) << 6))
        case (2, 7):  // C.SDSP
            return make(.sd, rs1: 2, rs2: rs2Full, imm: Int32(bits(12, 10) << 3 | bits(9, 7) << 6))
        default:
            return illegal
        }
    }
}
