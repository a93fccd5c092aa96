extension RISCVHart {
    /// The A extension: LR/SC with a reservation on one aligned doubleword, and the AMOs.
    /// One hart: the read-modify-write is atomic with respect to the guest by construction.
    func executeAtomic(_ d: DecodedInstruction) -> Bool {
        let raw = d.raw
        let wide = (raw >> 12) & 7 == 3
        let size: UInt64 = wide ? 8 : 4
        let funct5 = raw >> 27
        let address = x[Int(d.rs1)]
        let src = x[Int(d.rs2)]
        let rd = Int(d.rd)
        if address & (size - 1) != 0 {
            // AMOs and LR/SC must be naturally aligned.
            raise(funct5 == 0x02 ? Cause.loadMisaligned : Cause.storeMisaligned, tval: address)
            return false
        }
        if funct5 == 0x02 {  // LR
            guard let v = atomicLoad(address, wide) else { return false }
            guard let pa = translateForReservation(address) else { return false }
            st.pointee.reservation = pa & ~7
            x[rd] = v
            return true
        }
        if funct5 == 0x03 {  // SC
            // Translate for store first so faults are reported as store faults.
            guard let pa = translate(address, .store) else { return false }
            if st.pointee.reservation == pa & ~7 {
                st.pointee.reservation = .max
                guard wide ? store(address, src) : store(address, UInt32(truncatingIfNeeded: src)) else { return false }
                x[rd] = 0
            } else {
                st.pointee.reservation = .max
                x[rd] = 1
            }
            return true
        }
        // AMO: fault as a store (store/AMO page fault) before reading.
        guard translate(address, .store) != nil else { return false }
        guard let old = atomicLoad(address, wide) else { return false }
        let a = old, b = wide ? src : sext32(src)
        let result: UInt64
        switch funct5 {
        case 0x01: result = b
        case 0x00: result = a &+ b
        case 0x04: result = a ^ b
        case 0x0c: result = a & b
        case 0x08: result = a | b
        case 0x10: result = Int64(bitPattern: a) < Int64(bitPattern: b) ? a : b
        case 0x14: result = Int64(bitPattern: a) > Int64(bitPattern: b) ? a : b
        case 0x18: result = wide ? min(a, b) : (UInt32(truncatingIfNeeded: a) < UInt32(truncatingIfNeeded: b) ? a : b)
        default: result = wide ? max(a, b) : (UInt32(truncatingIfNeeded: a) > UInt32(truncatingIfNeeded: b) ? a : b)
        }
        guard wide ? store(address, result) : store(address, UInt32(truncatingIfNeeded: result)) else { return false }
        x[rd] = old
        return true
    }

    /// Loads 4 (sign-extended) or 8 bytes for LR and AMOs.
    private func atomicLoad(_ address: UInt64, _ wide: Bool) -> UInt64? {
        if wide { return load(address, UInt64.self) }
        guard let v = load(address, Int32.self) else { return nil }
        return UInt64(bitPattern: Int64(v))
    }

    private func translateForReservation(_ address: UInt64) -> UInt64? {
        translate(address, .load)
    }
}
