/// SBI extension ids (RISC-V Supervisor Binary Interface specification v2.0).
enum SBIExtension: UInt64 {
    case legacySetTimer = 0x00
    case legacyPutchar = 0x01
    case legacyGetchar = 0x02
    case base = 0x10
    case time = 0x5449_4D45
    case ipi = 0x0073_5049
    case rfence = 0x5246_4E43
    case hsm = 0x0048_534D
    case srst = 0x5352_5354
    case dbcn = 0x4442_434E
}

/// SBI error codes.
enum SBIError: Int64 {
    case success = 0
    case failed = -1
    case notSupported = -2
    case invalidParam = -3
    case invalidAddress = -5
    case alreadyAvailable = -6
}

extension RISCVHart {
    /// Implementation id reported by sbi_get_impl_id (not one registered to another firmware).
    static let sbiImplementationID: UInt64 = 0x514D  // "QM"
    static let sbiImplementationVersion: UInt64 = 1

    /// Handles `ecall` from S-mode: a7 = extension, a6 = function, a0...a5 arguments;
    /// returns the error in a0 and the value in a1.
    func sbiCall() {
        let eid = x[17], fid = x[16]
        let a0 = x[10], a1 = x[11], a2 = x[12]
        var error = SBIError.success
        var value: UInt64 = 0
        guard let ext = SBIExtension(rawValue: eid) else {
            x[10] = UInt64(bitPattern: SBIError.notSupported.rawValue)
            return
        }
        switch ext {
        case .legacySetTimer:
            setTimer(a0)
            x[10] = 0
            return
        case .legacyPutchar:
            var byte = UInt8(truncatingIfNeeded: a0)
            // SAFETY: a pointer to a local byte, used only during the call.
            withUnsafeBytes(of: &byte) { platform.consoleWrite($0) }
            x[10] = 0
            return
        case .legacyGetchar:
            x[10] = platform.consoleRead().map { UInt64($0) } ?? UInt64.max
            return
        case .base:
            switch fid {
            case 0: value = 2 << 24  // v2.0
            case 1: value = RISCVHart.sbiImplementationID
            case 2: value = RISCVHart.sbiImplementationVersion
            case 3: value = SBIExtension(rawValue: a0) != nil ? 1 : 0
            case 4, 5, 6: value = 0  // mvendorid, marchid, mimpid
            default: error = .notSupported
            }
        case .time:
            if fid == 0 { setTimer(a0) } else { error = .notSupported }
        case .ipi:
            if fid == 0 {
                if targets(mask: a0, base: a1) {
                    st.pointee.sipSoft |= Interrupt.ssi
                    st.pointee.endBlock = true
                }
            } else {
                error = .notSupported
            }
        case .rfence:
            switch fid {
            case 0:  // remote_fence_i
                instructionFence()
                st.pointee.endBlock = true
            case 1, 2:  // remote_sfence_vma(_asid)
                flushTLB()
                st.pointee.endBlock = true
            default: error = .notSupported
            }
        case .hsm:
            switch fid {
            case 0: error = a0 == hartID ? .alreadyAvailable : .invalidParam  // hart_start
            case 1:  // hart_stop: the only hart stops until the machine stops it
                st.pointee.halted = true
                st.pointee.endBlock = true
            case 2:
                if a0 == hartID { value = 0 } else { error = .invalidParam }  // STARTED
            default: error = .notSupported
            }
        case .srst:
            if fid != 0 { error = .notSupported; break }
            switch a0 {
            case 0: exitReason = .shutdown
            case 1, 2: exitReason = .reset
            default: error = .invalidParam
            }
            if exitReason != nil { st.pointee.endBlock = true }
        case .dbcn:
            switch fid {
            case 0, 1:  // console_write / console_read (num_bytes, base_lo, base_hi): physical addresses
                let count = a0, address = a1
                guard a2 == 0, let p = ram.pointer(at: address, count: count) else { error = .invalidParam; break }
                if fid == 0 {
                    platform.consoleWrite(UnsafeRawBufferPointer(start: p, count: Int(count)))
                    value = count
                } else {
                    var n: UInt64 = 0
                    while n < count, let byte = platform.consoleRead() {
                        // SAFETY: `p` came from `ram.pointer(at:count: count)` and `n < count`.
                        p.storeBytes(of: byte, toByteOffset: Int(n), as: UInt8.self)
                        n += 1
                    }
                    if n > 0 { invalidatePhysical(address, n) }
                    value = n
                }
            case 2:
                var byte = UInt8(truncatingIfNeeded: a0)
                // SAFETY: a pointer to a local byte, used only during the call.
                withUnsafeBytes(of: &byte) { platform.consoleWrite($0) }
            default: error = .notSupported
            }
        }
        x[10] = UInt64(bitPattern: error.rawValue)
        x[11] = value
    }

    /// True if an SBI hart mask (hart_mask, hart_mask_base) includes this hart.
    private func targets(mask: UInt64, base: UInt64) -> Bool {
        if base == UInt64.max { return true }
        guard hartID >= base, hartID - base < 64 else { return false }
        return mask >> (hartID - base) & 1 != 0
    }

    /// SBI set_timer: the timer interrupt is pending while time >= `deadline`; a new deadline clears it.
    func setTimer(_ deadline: UInt64) {
        st.pointee.stimecmp = deadline
        st.pointee.endBlock = true
    }
}
