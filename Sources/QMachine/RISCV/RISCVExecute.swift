extension RISCVHart {
    /// Runs up to `budget` instructions from the decoded-code cache; returns early after a
    /// trap, or after an instruction that changes interrupt or translation state (so that
    /// pending interrupts and stop requests are seen at block boundaries).
    func executeBlock(budget: Int) {
        let st = self.st, x = self.x
        var remaining = budget
        st.pointee.endBlock = false
        st.pointee.trapped = false
        loop: while remaining > 0 {
            remaining -= 1
            let pc = st.pointee.pc
            // Fetch from the decoded page of the current virtual page.
            if pc &- st.pointee.fetchVBase >= 4096 {
                guard refillFetch() else { break }
            }
            let slot = st.pointee.fetchCode.unsafelyUnwrapped + Int((pc & 0xfff) >> 1)
            var d = slot.pointee
            if d.op == .undecoded {
                var cacheable = false
                guard let decoded = decodeAtPC(cacheable: &cacheable) else { break }
                d = decoded
                if cacheable { slot.pointee = d }
            }
            let rs1 = x[Int(d.rs1)], rs2 = x[Int(d.rs2)]
            let imm = UInt64(bitPattern: Int64(d.imm))
            let rd = Int(d.rd)
            let next = pc &+ UInt64(d.length)
            switch d.op {
            case .lui: x[rd] = imm
            case .auipc: x[rd] = pc &+ imm
            case .jal:
                x[rd] = next; x[0] = 0
                st.pointee.pc = pc &+ imm; st.pointee.instret &+= 1
                continue
            case .jalr:
                let target = (rs1 &+ imm) & ~1
                x[rd] = next; x[0] = 0
                st.pointee.pc = target; st.pointee.instret &+= 1
                continue
            case .beq, .bne, .blt, .bge, .bltu, .bgeu:
                let taken: Bool
                switch d.op {
                case .beq: taken = rs1 == rs2
                case .bne: taken = rs1 != rs2
                case .blt: taken = Int64(bitPattern: rs1) < Int64(bitPattern: rs2)
                case .bge: taken = Int64(bitPattern: rs1) >= Int64(bitPattern: rs2)
                case .bltu: taken = rs1 < rs2
                default: taken = rs1 >= rs2
                }
                st.pointee.pc = taken ? pc &+ imm : next
                st.pointee.instret &+= 1
                continue
            case .lb:
                guard let v = load(rs1 &+ imm, Int8.self) else { break }
                x[rd] = UInt64(bitPattern: Int64(v))
            case .lh:
                guard let v = load(rs1 &+ imm, Int16.self) else { break }
                x[rd] = UInt64(bitPattern: Int64(v))
            case .lw:
                guard let v = load(rs1 &+ imm, Int32.self) else { break }
                x[rd] = UInt64(bitPattern: Int64(v))
            case .ld:
                guard let v = load(rs1 &+ imm, UInt64.self) else { break }
                x[rd] = v
            case .lbu:
                guard let v = load(rs1 &+ imm, UInt8.self) else { break }
                x[rd] = UInt64(v)
            case .lhu:
                guard let v = load(rs1 &+ imm, UInt16.self) else { break }
                x[rd] = UInt64(v)
            case .lwu:
                guard let v = load(rs1 &+ imm, UInt32.self) else { break }
                x[rd] = UInt64(v)
            case .sb: guard store(rs1 &+ imm, UInt8(truncatingIfNeeded: rs2)) else { break }
            case .sh: guard store(rs1 &+ imm, UInt16(truncatingIfNeeded: rs2)) else { break }
            case .sw: guard store(rs1 &+ imm, UInt32(truncatingIfNeeded: rs2)) else { break }
            case .sd: guard store(rs1 &+ imm, rs2) else { break }
            case .addi: x[rd] = rs1 &+ imm
            case .slti: x[rd] = Int64(bitPattern: rs1) < Int64(bitPattern: imm) ? 1 : 0
            case .sltiu: x[rd] = rs1 < imm ? 1 : 0
            case .xori: x[rd] = rs1 ^ imm
            case .ori: x[rd] = rs1 | imm
            case .andi: x[rd] = rs1 & imm
            case .slli: x[rd] = rs1 << (imm & 63)
            case .srli: x[rd] = rs1 >> (imm & 63)
            case .srai: x[rd] = UInt64(bitPattern: Int64(bitPattern: rs1) >> (imm & 63))
            case .add: x[rd] = rs1 &+ rs2
            case .sub: x[rd] = rs1 &- rs2
            case .sll: x[rd] = rs1 << (rs2 & 63)
            case .slt: x[rd] = Int64(bitPattern: rs1) < Int64(bitPattern: rs2) ? 1 : 0
            case .sltu: x[rd] = rs1 < rs2 ? 1 : 0
            case .xor: x[rd] = rs1 ^ rs2
            case .srl: x[rd] = rs1 >> (rs2 & 63)
            case .sra: x[rd] = UInt64(bitPattern: Int64(bitPattern: rs1) >> (rs2 & 63))
            case .or: x[rd] = rs1 | rs2
            case .and: x[rd] = rs1 & rs2
            case .addiw: x[rd] = sext32(rs1 &+ imm)
            case .slliw: x[rd] = sext32(UInt64(UInt32(truncatingIfNeeded: rs1) << UInt32(imm & 31)))
            case .srliw: x[rd] = sext32(UInt64(UInt32(truncatingIfNeeded: rs1) >> UInt32(imm & 31)))
            case .sraiw: x[rd] = UInt64(bitPattern: Int64(Int32(truncatingIfNeeded: rs1) >> Int32(imm & 31)))
            case .addw: x[rd] = sext32(rs1 &+ rs2)
            case .subw: x[rd] = sext32(rs1 &- rs2)
            case .sllw: x[rd] = sext32(UInt64(UInt32(truncatingIfNeeded: rs1) << UInt32(rs2 & 31)))
            case .srlw: x[rd] = sext32(UInt64(UInt32(truncatingIfNeeded: rs1) >> UInt32(rs2 & 31)))
            case .sraw: x[rd] = UInt64(bitPattern: Int64(Int32(truncatingIfNeeded: rs1) >> Int32(rs2 & 31)))
            case .mul: x[rd] = rs1 &* rs2
            case .mulh:
                x[rd] = UInt64(bitPattern: Int64(bitPattern: rs1).multipliedFullWidth(by: Int64(bitPattern: rs2)).high)
            case .mulhu: x[rd] = rs1.multipliedFullWidth(by: rs2).high
            case .mulhsu:
                // signed × unsigned: the unsigned high word, corrected when rs1 is negative.
                var high = rs1.multipliedFullWidth(by: rs2).high
                if Int64(bitPattern: rs1) < 0 { high = high &- rs2 }
                x[rd] = high
            case .div:
                let a = Int64(bitPattern: rs1), b = Int64(bitPattern: rs2)
                if b == 0 { x[rd] = .max } else if a == .min && b == -1 { x[rd] = rs1 } else { x[rd] = UInt64(bitPattern: a / b) }
            case .divu: x[rd] = rs2 == 0 ? .max : rs1 / rs2
            case .rem:
                let a = Int64(bitPattern: rs1), b = Int64(bitPattern: rs2)
                if b == 0 { x[rd] = rs1 } else if a == .min && b == -1 { x[rd] = 0 } else { x[rd] = UInt64(bitPattern: a % b) }
            case .remu: x[rd] = rs2 == 0 ? rs1 : rs1 % rs2
            case .mulw: x[rd] = sext32(rs1 &* rs2)
            case .divw:
                let a = Int32(truncatingIfNeeded: rs1), b = Int32(truncatingIfNeeded: rs2)
                let q: Int32 = b == 0 ? -1 : (a == .min && b == -1 ? a : a / b)
                x[rd] = UInt64(bitPattern: Int64(q))
            case .divuw:
                let a = UInt32(truncatingIfNeeded: rs1), b = UInt32(truncatingIfNeeded: rs2)
                x[rd] = sext32(UInt64(b == 0 ? .max : a / b))
            case .remw:
                let a = Int32(truncatingIfNeeded: rs1), b = Int32(truncatingIfNeeded: rs2)
                let r: Int32 = b == 0 ? a : (a == .min && b == -1 ? 0 : a % b)
                x[rd] = UInt64(bitPattern: Int64(r))
            case .remuw:
                let a = UInt32(truncatingIfNeeded: rs1), b = UInt32(truncatingIfNeeded: rs2)
                x[rd] = sext32(UInt64(b == 0 ? a : a % b))
            case .fence: break
            case .fencei:
                code.currentGeneration &+= 1
                st.pointee.fetchVBase = .max
                st.pointee.endBlock = true
            case .ecall:
                if st.pointee.priv == Priv.user {
                    raise(Cause.ecallFromU, tval: 0)
                    break
                }
                sbiCall()
            case .ebreak:
                raise(Cause.breakpoint, tval: pc)
                break
            case .sret:
                guard st.pointee.priv == Priv.supervisor else { illegal(d); break }
                returnFromTrap()
                st.pointee.instret &+= 1
                break loop  // pending interrupts are checked in the new privilege
            case .wfi:
                guard st.pointee.priv == Priv.supervisor else { illegal(d); break }
                st.pointee.wfi = true
                st.pointee.endBlock = true
            case .sfencevma:
                guard st.pointee.priv == Priv.supervisor else { illegal(d); break }
                flushTLB()
                st.pointee.endBlock = true
            case .csr:
                guard executeCSR(d) else { break }
            case .amo:
                guard executeAtomic(d) else { break }
            case .flw, .fld, .fsw, .fsd, .fp:
                guard executeFloat(d) else { break }
            case .illegal, .undecoded:
                illegal(d)
            }
            x[0] = 0
            if st.pointee.trapped { break }
            st.pointee.pc = next
            st.pointee.instret &+= 1
            if st.pointee.endBlock { break }
        }
        st.pointee.trapped = false
    }

    @inline(__always) func sext32(_ v: UInt64) -> UInt64 {
        UInt64(bitPattern: Int64(Int32(truncatingIfNeeded: v)))
    }

    /// Raises an illegal-instruction exception with stval = the instruction bits.
    func illegal(_ d: DecodedInstruction) {
        raise(Cause.illegalInstruction, tval: UInt64(d.raw))
    }
}
