extension RISCVHart {
    /// Runs up to `budget` instructions from the decoded-code cache; returns early after a
    /// trap, or after an instruction that changes interrupt or translation state (so that
    /// pending interrupts and stop requests are seen at block boundaries).
    func executeBlock(budget: Int) {
        let st = self.st, x = self.x
        // The pc of the instruction being executed lives in `pc` and is mirrored in
        // st.pc (which traps read); instructions retired are counted locally.
        var pc = st.pointee.pc
        var retired = 0
        var limit = budget
        st.pointee.endBlock = false
        st.pointee.trapped = false
        defer {
            // A trap (or sret) has already pointed st.pc where execution continues.
            if !st.pointee.trapped { st.pointee.pc = pc }
            st.pointee.trapped = false
            st.pointee.instret &+= UInt64(retired)
        }
        // The fetch page, cached here: everything that changes translation or privilege
        // ends the block, and pages whose code is invalidated stay allocated (emptied).
        // (`.max` means none; it is tested apart, as `pc &- .max` is small for pc < 4095.)
        if st.pointee.fetchVBase == .max || pc &- st.pointee.fetchVBase >= 4096 {
            guard refillFetch() else { return }
        }
        var fetchBase = st.pointee.fetchVBase
        var fetchCode = st.pointee.fetchCode.unsafelyUnwrapped
        // The decoded slot of `pc`. Sequential instructions advance it (running off the page
        // lands on a `.pageEnd` slot), jumps and taken branches locate their target, so
        // only they check page bounds; empty slots decode and dispatch again.
        var slot = fetchCode + Int((pc &- fetchBase) >> 1)
        loop: while retired < limit {
            let d = slot.pointee
            // Operands are read in each case (x[r1], x[r2]), before the case writes x[rd].
            let r1 = Int(d.rs1), r2 = Int(d.rs2)
            let imm = UInt64(bitPattern: Int64(d.imm))
            let rd = d.rd
            switch d.op {
            case .undecoded:
                // st.pc is only written before calls that may trap or read it.
                var cacheable = false
                st.pointee.pc = pc
                guard let decoded = decodeAtPC(cacheable: &cacheable) else { break loop }
                if cacheable {
                    // A store may have emptied this page earlier in the block: watch it again
                    // before caching, or later stores would miss this instruction.
                    watchFetchPage()
                    slot.pointee = decoded
                } else {
                    straddle.pointee = decoded
                    slot = straddle
                }
                continue
            case .pageEnd:
                st.pointee.pc = pc
                guard refillFetch() else { break loop }
                fetchBase = st.pointee.fetchVBase
                fetchCode = st.pointee.fetchCode.unsafelyUnwrapped
                slot = fetchCode + Int((pc &- fetchBase) >> 1)
                continue
            case .lui: x[rd] = imm
            case .auipc: x[rd] = pc &+ imm
            case .jal:
                x[rd] = pc &+ d.length
                pc = pc &+ imm
                slot = Self.locate(pc, fetchBase, fetchCode)
                retired &+= 1
                continue
            case .jalr:
                let target = (x[r1] &+ imm) & ~1
                x[rd] = pc &+ d.length
                pc = target
                slot = Self.locate(pc, fetchBase, fetchCode)
                retired &+= 1
                continue
            case .beq:
                if x[r1] == x[r2] { pc = pc &+ imm; slot = Self.locate(pc, fetchBase, fetchCode); retired &+= 1; continue }
            case .bne:
                if x[r1] != x[r2] { pc = pc &+ imm; slot = Self.locate(pc, fetchBase, fetchCode); retired &+= 1; continue }
            case .blt:
                if Int64(bitPattern: x[r1]) < Int64(bitPattern: x[r2]) {
                    pc = pc &+ imm; slot = Self.locate(pc, fetchBase, fetchCode); retired &+= 1; continue
                }
            case .bge:
                if Int64(bitPattern: x[r1]) >= Int64(bitPattern: x[r2]) {
                    pc = pc &+ imm; slot = Self.locate(pc, fetchBase, fetchCode); retired &+= 1; continue
                }
            case .bltu:
                if x[r1] < x[r2] { pc = pc &+ imm; slot = Self.locate(pc, fetchBase, fetchCode); retired &+= 1; continue }
            case .bgeu:
                if x[r1] >= x[r2] { pc = pc &+ imm; slot = Self.locate(pc, fetchBase, fetchCode); retired &+= 1; continue }
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
                pc = pc &+ d.length; retired &+= 1
                break loop
            case .ecall:
                st.pointee.pc = pc
                if st.pointee.priv == Priv.user {
                    raise(Cause.ecallFromU, tval: 0)
                    break loop
                }
                sbiCall()
                if st.pointee.endBlock { pc = pc &+ d.length; retired &+= 1; break loop }
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
                pc = pc &+ d.length; retired &+= 1
                break loop
            case .sfencevma:
                st.pointee.pc = pc
                guard st.pointee.priv == Priv.supervisor else { illegal(d); break loop }
                flushTLB()
                pc = pc &+ d.length; retired &+= 1
                break loop
            case .csr:
                st.pointee.pc = pc
                st.pointee.instret &+= UInt64(retired)
                limit -= retired; retired = 0
                guard executeCSR(d) else { break loop }
                if st.pointee.endBlock { pc = pc &+ d.length; retired &+= 1; break loop }
            case .amo:
                st.pointee.pc = pc
                guard executeAtomic(d) else { break loop }
            case .flw, .fld, .fsw, .fsd, .fp:
                st.pointee.pc = pc
                guard executeFloat(d) else { break loop }
            case .illegal:
                st.pointee.pc = pc
                illegal(d)
                break loop
            }
            // The sequential successor.
            pc = pc &+ d.length
            slot += Int(d.length >> 1)
            retired &+= 1
        }
    }

    /// The decoded slot of a jump target: in the current page, or a `.pageEnd` slot that
    /// makes the interpreter translate the target.
    @inline(__always)
    static func locate(_ target: UInt64, _ fetchBase: UInt64, _ fetchCode: UnsafeMutablePointer<DecodedInstruction>) -> UnsafeMutablePointer<DecodedInstruction> {
        let offset = target &- fetchBase
        return fetchCode + (offset < 4096 ? Int(offset >> 1) : CodeCache.slots)
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
