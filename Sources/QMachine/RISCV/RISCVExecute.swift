extension RISCVHart {
    /// Runs up to `budget` instructions from the decoded-code cache; returns early after a
    /// trap, or after an instruction that changes interrupt or translation state (so that
    /// pending interrupts and stop requests are seen at block boundaries).
    func executeBlock(budget: Int) {
        let st = self.st, x = self.x
        var remaining = budget
        // The pc of the instruction being executed lives in `pc` and is mirrored in
        // st.pc (which traps read); instructions retired are counted locally.
        var pc = st.pointee.pc
        var retired: UInt64 = 0
        // The fetch page, cached here: everything that changes translation or privilege
        // ends the block, and pages whose code is invalidated stay allocated (emptied).
        var fetchBase = st.pointee.fetchVBase
        var fetchCode = st.pointee.fetchCode
        st.pointee.endBlock = false
        st.pointee.trapped = false
        defer {
            // A trap (or sret) has already pointed st.pc where execution continues.
            if !st.pointee.trapped { st.pointee.pc = pc }
            st.pointee.trapped = false
            st.pointee.instret &+= retired
        }
        loop: while remaining > 0 {
            remaining -= 1
            // st.pc is only written before calls that may trap or read it.
            // Fetch from the decoded page of the current virtual page.
            if pc &- fetchBase >= 4096 {
                st.pointee.pc = pc
                guard refillFetch() else { break loop }
                fetchBase = st.pointee.fetchVBase
                fetchCode = st.pointee.fetchCode
            }
            let slot = fetchCode.unsafelyUnwrapped + Int((pc & 0xfff) >> 1)
            var d = slot.pointee
            if d.op == .undecoded {
                var cacheable = false
                st.pointee.pc = pc
                guard let decoded = decodeAtPC(cacheable: &cacheable) else { break loop }
                d = decoded
                if cacheable { slot.pointee = d }
            }
            // Operands are read in each case (x[r1], x[r2]), before the case writes x[rd].
            let r1 = Int(d.rs1), r2 = Int(d.rs2)
            let imm = UInt64(bitPattern: Int64(d.imm))
            let rd = d.rd
            let next = pc &+ d.length
            switch d.op {
            case .lui: x[rd] = imm
            case .auipc: x[rd] = pc &+ imm
            case .jal:
                x[rd] = next
                pc = pc &+ imm; retired &+= 1
                continue
            case .jalr:
                let target = (x[r1] &+ imm) & ~1
                x[rd] = next
                pc = target; retired &+= 1
                continue
            case .beq, .bne, .blt, .bge, .bltu, .bgeu:
                let taken: Bool
                switch d.op {
                case .beq: taken = x[r1] == x[r2]
                case .bne: taken = x[r1] != x[r2]
                case .blt: taken = Int64(bitPattern: x[r1]) < Int64(bitPattern: x[r2])
                case .bge: taken = Int64(bitPattern: x[r1]) >= Int64(bitPattern: x[r2])
                case .bltu: taken = x[r1] < x[r2]
                default: taken = x[r1] >= x[r2]
                }
                pc = taken ? pc &+ imm : next
                retired &+= 1
                continue
            case .lb:
                guard let v = load(x[r1] &+ imm, Int8.self, pc: pc) else { break loop }
                x[rd] = UInt64(bitPattern: Int64(v))
            case .lh:
                guard let v = load(x[r1] &+ imm, Int16.self, pc: pc) else { break loop }
                x[rd] = UInt64(bitPattern: Int64(v))
            case .lw:
                guard let v = load(x[r1] &+ imm, Int32.self, pc: pc) else { break loop }
                x[rd] = UInt64(bitPattern: Int64(v))
            case .ld:
                guard let v = load(x[r1] &+ imm, UInt64.self, pc: pc) else { break loop }
                x[rd] = v
            case .lbu:
                guard let v = load(x[r1] &+ imm, UInt8.self, pc: pc) else { break loop }
                x[rd] = UInt64(v)
            case .lhu:
                guard let v = load(x[r1] &+ imm, UInt16.self, pc: pc) else { break loop }
                x[rd] = UInt64(v)
            case .lwu:
                guard let v = load(x[r1] &+ imm, UInt32.self, pc: pc) else { break loop }
                x[rd] = UInt64(v)
            case .sb: guard store(x[r1] &+ imm, UInt8(truncatingIfNeeded: x[r2]), pc: pc) else { break loop }
            case .sh: guard store(x[r1] &+ imm, UInt16(truncatingIfNeeded: x[r2]), pc: pc) else { break loop }
            case .sw: guard store(x[r1] &+ imm, UInt32(truncatingIfNeeded: x[r2]), pc: pc) else { break loop }
            case .sd: guard store(x[r1] &+ imm, x[r2], pc: pc) else { break loop }
            case .addi: x[rd] = x[r1] &+ imm
            case .slti: x[rd] = Int64(bitPattern: x[r1]) < Int64(bitPattern: imm) ? 1 : 0
            case .sltiu: x[rd] = x[r1] < imm ? 1 : 0
            case .xori: x[rd] = x[r1] ^ imm
            case .ori: x[rd] = x[r1] | imm
            case .andi: x[rd] = x[r1] & imm
            case .slli: x[rd] = x[r1] << (imm & 63)
            case .srli: x[rd] = x[r1] >> (imm & 63)
            case .srai: x[rd] = UInt64(bitPattern: Int64(bitPattern: x[r1]) >> (imm & 63))
            case .add: x[rd] = x[r1] &+ x[r2]
            case .sub: x[rd] = x[r1] &- x[r2]
            case .sll: x[rd] = x[r1] << (x[r2] & 63)
            case .slt: x[rd] = Int64(bitPattern: x[r1]) < Int64(bitPattern: x[r2]) ? 1 : 0
            case .sltu: x[rd] = x[r1] < x[r2] ? 1 : 0
            case .xor: x[rd] = x[r1] ^ x[r2]
            case .srl: x[rd] = x[r1] >> (x[r2] & 63)
            case .sra: x[rd] = UInt64(bitPattern: Int64(bitPattern: x[r1]) >> (x[r2] & 63))
            case .or: x[rd] = x[r1] | x[r2]
            case .and: x[rd] = x[r1] & x[r2]
            case .addiw: x[rd] = sext32(x[r1] &+ imm)
            case .slliw: x[rd] = sext32(UInt64(UInt32(truncatingIfNeeded: x[r1]) << UInt32(imm & 31)))
            case .srliw: x[rd] = sext32(UInt64(UInt32(truncatingIfNeeded: x[r1]) >> UInt32(imm & 31)))
            case .sraiw: x[rd] = UInt64(bitPattern: Int64(Int32(truncatingIfNeeded: x[r1]) >> Int32(imm & 31)))
            case .addw: x[rd] = sext32(x[r1] &+ x[r2])
            case .subw: x[rd] = sext32(x[r1] &- x[r2])
            case .sllw: x[rd] = sext32(UInt64(UInt32(truncatingIfNeeded: x[r1]) << UInt32(x[r2] & 31)))
            case .srlw: x[rd] = sext32(UInt64(UInt32(truncatingIfNeeded: x[r1]) >> UInt32(x[r2] & 31)))
            case .sraw: x[rd] = UInt64(bitPattern: Int64(Int32(truncatingIfNeeded: x[r1]) >> Int32(x[r2] & 31)))
            case .mul: x[rd] = x[r1] &* x[r2]
            case .mulh:
                x[rd] = UInt64(bitPattern: Int64(bitPattern: x[r1]).multipliedFullWidth(by: Int64(bitPattern: x[r2])).high)
            case .mulhu: x[rd] = x[r1].multipliedFullWidth(by: x[r2]).high
            case .mulhsu:
                // signed × unsigned: the unsigned high word, corrected when x[r1] is negative.
                var high = x[r1].multipliedFullWidth(by: x[r2]).high
                if Int64(bitPattern: x[r1]) < 0 { high = high &- x[r2] }
                x[rd] = high
            case .div:
                let a = Int64(bitPattern: x[r1]), b = Int64(bitPattern: x[r2])
                if b == 0 { x[rd] = .max } else if a == .min && b == -1 { x[rd] = x[r1] } else { x[rd] = UInt64(bitPattern: a / b) }
            case .divu: x[rd] = x[r2] == 0 ? .max : x[r1] / x[r2]
            case .rem:
                let a = Int64(bitPattern: x[r1]), b = Int64(bitPattern: x[r2])
                if b == 0 { x[rd] = x[r1] } else if a == .min && b == -1 { x[rd] = 0 } else { x[rd] = UInt64(bitPattern: a % b) }
            case .remu: x[rd] = x[r2] == 0 ? x[r1] : x[r1] % x[r2]
            case .mulw: x[rd] = sext32(x[r1] &* x[r2])
            case .divw:
                let a = Int32(truncatingIfNeeded: x[r1]), b = Int32(truncatingIfNeeded: x[r2])
                let q: Int32 = b == 0 ? -1 : (a == .min && b == -1 ? a : a / b)
                x[rd] = UInt64(bitPattern: Int64(q))
            case .divuw:
                let a = UInt32(truncatingIfNeeded: x[r1]), b = UInt32(truncatingIfNeeded: x[r2])
                x[rd] = sext32(UInt64(b == 0 ? .max : a / b))
            case .remw:
                let a = Int32(truncatingIfNeeded: x[r1]), b = Int32(truncatingIfNeeded: x[r2])
                let r: Int32 = b == 0 ? a : (a == .min && b == -1 ? 0 : a % b)
                x[rd] = UInt64(bitPattern: Int64(r))
            case .remuw:
                let a = UInt32(truncatingIfNeeded: x[r1]), b = UInt32(truncatingIfNeeded: x[r2])
                x[rd] = sext32(UInt64(b == 0 ? a : a % b))
            case .fence: break
            case .fencei:
                instructionFence()
                pc = next; retired &+= 1
                break loop
            case .ecall:
                st.pointee.pc = pc
                if st.pointee.priv == Priv.user {
                    raise(Cause.ecallFromU, tval: 0)
                    break loop
                }
                sbiCall()
                pc = next; retired &+= 1
                if st.pointee.endBlock { break loop }
                continue
            case .ebreak:
                st.pointee.pc = pc
                raise(Cause.breakpoint, tval: pc)
                break loop
            case .sret:
                st.pointee.pc = pc
                guard st.pointee.priv == Priv.supervisor else { illegal(d); break loop }
                returnFromTrap()
                pc = st.pointee.pc; retired &+= 1
                break loop  // pending interrupts are checked in the new privilege
            case .wfi:
                st.pointee.pc = pc
                guard st.pointee.priv == Priv.supervisor else { illegal(d); break loop }
                st.pointee.wfi = true
                pc = next; retired &+= 1
                break loop
            case .sfencevma:
                st.pointee.pc = pc
                guard st.pointee.priv == Priv.supervisor else { illegal(d); break loop }
                flushTLB()
                pc = next; retired &+= 1
                break loop
            case .csr:
                st.pointee.pc = pc
                st.pointee.instret &+= retired; retired = 0
                guard executeCSR(d) else { break loop }
                pc = next; retired &+= 1
                if st.pointee.endBlock { break loop }
                continue
            case .amo:
                st.pointee.pc = pc
                guard executeAtomic(d) else { break loop }
            case .flw, .fld, .fsw, .fsd, .fp:
                st.pointee.pc = pc
                guard executeFloat(d) else { break loop }
            case .illegal, .undecoded:
                st.pointee.pc = pc
                illegal(d)
                break loop
            }
            pc = next
            retired &+= 1
        }
    }

    @inline(__always) func sext32(_ v: UInt64) -> UInt64 {
        UInt64(bitPattern: Int64(Int32(truncatingIfNeeded: v)))
    }

    /// Raises an illegal-instruction exception with stval = the instruction bits (read
    /// again from memory for operations whose decoded form keeps an immediate instead).
    func illegal(_ d: DecodedInstruction) {
        let bits = d.op.carriesRaw ? d.raw : peekInstruction(at: st.pointee.pc) ?? 0
        raise(Cause.illegalInstruction, tval: UInt64(bits))
    }
}
