/// CSR numbers visible to S and U mode (privileged spec, "CSR Listing").
enum CSR {
    static let fflags: UInt32 = 0x001, frm: UInt32 = 0x002, fcsr: UInt32 = 0x003
    static let cycle: UInt32 = 0xC00, time: UInt32 = 0xC01, instret: UInt32 = 0xC02
    static let sstatus: UInt32 = 0x100, sie: UInt32 = 0x104, stvec: UInt32 = 0x105
    static let scounteren: UInt32 = 0x106, senvcfg: UInt32 = 0x10A
    static let sscratch: UInt32 = 0x140, sepc: UInt32 = 0x141, scause: UInt32 = 0x142
    static let stval: UInt32 = 0x143, sip: UInt32 = 0x144, satp: UInt32 = 0x180
}

extension RISCVHart {
    // MARK: Traps

    /// Raises a synchronous exception (or, with bit 63 in `cause`, takes an interrupt) at
    /// `st.pc`: S-mode handles everything (all delegated, as OpenSBI configures medeleg/mideleg).
    func raise(_ cause: UInt64, tval: UInt64) {
        trap(cause: cause, tval: tval)
    }

    func trap(cause: UInt64, tval: UInt64) {
        if peeking { st.pointee.trapped = true; return }
        let pc = st.pointee.pc
        let base = st.pointee.stvec & ~3
        let isInterrupt = cause >> 63 != 0
        if base == 0 {
            crash("trap with stvec=0: scause=0x\(hex(cause)) stval=0x\(hex(tval))", pc: pc)
            return
        }
        // A fetch fault at the trap vector itself cannot be delivered: it would repeat forever.
        if !isInterrupt && (cause == Cause.fetchPageFault || cause == Cause.fetchAccess) && pc == base {
            crash("instruction fetch fault at the trap vector: scause=0x\(hex(cause)) stval=0x\(hex(tval))", pc: pc)
            return
        }
        st.pointee.sepc = pc
        st.pointee.scause = cause
        st.pointee.stval = tval
        var s = st.pointee.status
        s = (s & ~Status.spp) | (st.pointee.priv == Priv.supervisor ? Status.spp : 0)
        s = (s & ~Status.spie) | (s & Status.sie != 0 ? Status.spie : 0)
        s &= ~Status.sie
        st.pointee.status = s
        st.pointee.priv = Priv.supervisor
        st.pointee.reservation = .max
        let vectored = st.pointee.stvec & 3 == 1 && isInterrupt
        st.pointee.pc = vectored ? base &+ 4 &* (cause & 63) : base
        st.pointee.trapped = true
        privilegeChanged()
    }

    func crash(_ what: String, pc: UInt64) {
        var message = "guest crash: \(what) pc=0x\(hex(pc))"
        if let insn = peekInstruction(at: pc) { message += " insn=0x\(hex(UInt64(insn)))" }
        message += " priv=\(st.pointee.priv == Priv.user ? "U" : "S") satp=0x\(hex(st.pointee.satp)) ra=0x\(hex(x[1])) sp=0x\(hex(x[2]))"
        exitReason = .crashed(message)
        st.pointee.trapped = true
        st.pointee.endBlock = true
    }

    func hex(_ v: UInt64) -> String { String(v, radix: 16) }

    /// sret: back to sepc in the privilege of sstatus.SPP.
    func returnFromTrap() {
        var s = st.pointee.status
        st.pointee.priv = s & Status.spp != 0 ? Priv.supervisor : Priv.user
        s = (s & ~Status.sie) | (s & Status.spie != 0 ? Status.sie : 0)
        s |= Status.spie
        s &= ~Status.spp
        st.pointee.status = s
        st.pointee.pc = st.pointee.sepc
        st.pointee.reservation = .max
        st.pointee.endBlock = true
        privilegeChanged()
    }

    /// Recomputes the TLB bank and drops the fetch page after a change of privilege or SUM.
    func privilegeChanged() {
        if st.pointee.priv == Priv.user {
            st.pointee.tlbMode = 0
        } else {
            st.pointee.tlbMode = st.pointee.status & Status.sum != 0 ? 2 : 1
        }
        st.pointee.fetchVBase = .max
    }

    // MARK: CSR instructions

    /// csrrw/csrrs/csrrc and their immediate forms; false if it raised an exception.
    func executeCSR(_ d: DecodedInstruction) -> Bool {
        let number = d.raw >> 20
        let f3 = (d.raw >> 12) & 7
        let field = UInt64(d.rs1)
        let source = f3 >= 5 ? field : x[Int(d.rs1)]
        let writes = f3 & 3 == 1 || field != 0
        // Privilege and read-only checks from the CSR number (privileged spec, "CSR Address Mapping").
        let minPriv = UInt64((number >> 8) & 3)
        if minPriv > st.pointee.priv || (writes && number >> 10 == 3) {
            illegal(d)
            return false
        }
        if number == CSR.fflags || number == CSR.frm || number == CSR.fcsr {
            if st.pointee.status & Status.fs == 0 { illegal(d); return false }
        }
        if number >= CSR.cycle && number <= 0xC1F && st.pointee.priv == Priv.user {
            if st.pointee.scounteren >> UInt64(number - CSR.cycle) & 1 == 0 { illegal(d); return false }
        }
        guard let old = csrRead(number) else { illegal(d); return false }
        if writes {
            let value: UInt64
            switch f3 & 3 {
            case 1: value = source
            case 2: value = old | source
            default: value = old & ~source
            }
            csrWrite(number, value)
        }
        x[Int(d.rd)] = old
        return true
    }

    func csrRead(_ number: UInt32) -> UInt64? {
        let s = st.pointee
        switch number {
        case CSR.fflags: return s.fflags
        case CSR.frm: return s.frm
        case CSR.fcsr: return s.frm << 5 | s.fflags
        case CSR.cycle, CSR.instret: return s.instret
        case CSR.time: return timeNow()
        case 0xC03...0xC1F: return 0
        case CSR.sstatus:
            var v = s.status | Status.uxl64
            if v & Status.fs == Status.fsDirty { v |= Status.sd }
            return v
        case CSR.sie: return s.sie
        case CSR.stvec: return s.stvec
        case CSR.scounteren: return s.scounteren
        case CSR.senvcfg: return s.senvcfg
        case CSR.sscratch: return s.sscratch
        case CSR.sepc: return s.sepc
        case CSR.scause: return s.scause
        case CSR.stval: return s.stval
        case CSR.sip: return pendingInterrupts()
        case CSR.satp: return s.satp
        default: return nil
        }
    }

    func csrWrite(_ number: UInt32, _ value: UInt64) {
        switch number {
        case CSR.fflags:
            st.pointee.fflags = value & 0x1f
            st.pointee.status |= Status.fsDirty
        case CSR.frm:
            st.pointee.frm = value & 7
            st.pointee.status |= Status.fsDirty
        case CSR.fcsr:
            st.pointee.fflags = value & 0x1f
            st.pointee.frm = (value >> 5) & 7
            st.pointee.status |= Status.fsDirty
        case CSR.sstatus:
            let old = st.pointee.status
            st.pointee.status = (old & ~Status.writable) | (value & Status.writable)
            if (old ^ value) & Status.mxr != 0 { flushTLB() }
            privilegeChanged()
            st.pointee.endBlock = true
        case CSR.sie:
            st.pointee.sie = value & Interrupt.supervisorMask
            st.pointee.endBlock = true
        case CSR.stvec:
            // Modes 0 (direct) and 1 (vectored); the reserved modes read back as direct.
            st.pointee.stvec = value & 3 >= 2 ? value & ~3 : value
        case CSR.scounteren: st.pointee.scounteren = value & 0xffff_ffff
        case CSR.senvcfg: st.pointee.senvcfg = value & 1  // FIOM only
        case CSR.sscratch: st.pointee.sscratch = value
        case CSR.sepc: st.pointee.sepc = value & ~1
        case CSR.scause: st.pointee.scause = value
        case CSR.stval: st.pointee.stval = value
        case CSR.sip:
            st.pointee.sipSoft = value & Interrupt.ssi
            st.pointee.endBlock = true
        case CSR.satp:
            // WARL: Bare, Sv39 and Sv48; other modes (Sv57) leave satp unchanged. No ASID bits.
            let mode = value >> 60
            guard mode == 0 || mode == 8 || mode == 9 else { return }
            st.pointee.satp = value & (0xF << 60 | ((1 << 44) - 1))
            flushTLB()
            st.pointee.endBlock = true
        default: break
        }
    }
}
