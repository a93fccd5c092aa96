#if canImport(Glibc)
import Glibc
#endif

/// fflags bits.
enum FFlag {
    static let nx: UInt64 = 1, uf: UInt64 = 2, of: UInt64 = 4, dz: UInt64 = 8, nv: UInt64 = 16
}

/// The F and D extensions. Arithmetic runs on the host FPU under the guest's rounding mode
/// (round-to-nearest-max-magnitude, which hosts lack, is done as round-to-nearest-even except
/// in conversions to integers), host exception flags become fflags, and NaN results are the
/// RISC-V canonical NaN. Comparisons, min/max, sign injection, classification and
/// float-to-integer conversions are done in software to follow the RISC-V rules exactly.
extension RISCVHart {
    /// FE_ALL_EXCEPT (a macro Swift does not import).
    static let hostAllExceptions: Int32 = FE_INEXACT | FE_UNDERFLOW | FE_OVERFLOW | FE_DIVBYZERO | FE_INVALID
    static let canonicalNaN32: UInt32 = 0x7fc0_0000
    static let canonicalNaN64: UInt64 = 0x7ff8_0000_0000_0000

    @inline(__always) func readS(_ r: Int) -> Float {
        let v = f[r]
        return v >> 32 == 0xffff_ffff ? Float(bitPattern: UInt32(truncatingIfNeeded: v)) : Float(bitPattern: RISCVHart.canonicalNaN32)
    }
    @inline(__always) func readD(_ r: Int) -> Double { Double(bitPattern: f[r]) }
    @inline(__always) func writeS(_ r: Int, _ v: Float) {
        let bits = v.isNaN ? RISCVHart.canonicalNaN32 : v.bitPattern
        f[r] = 0xffff_ffff_0000_0000 | UInt64(bits)
    }
    @inline(__always) func writeD(_ r: Int, _ v: Double) {
        f[r] = v.isNaN ? RISCVHart.canonicalNaN64 : v.bitPattern
    }
    @inline(__always) func boxS(_ bits: UInt32) -> UInt64 { 0xffff_ffff_0000_0000 | UInt64(bits) }

    /// Runs `body` on the host FPU with the guest rounding mode `rm` and accrues the host
    /// exception flags into fflags.
    @inline(__always) func hostFP<T>(_ rm: UInt64, _ body: () -> T) -> T {
        feclearexcept(RISCVHart.hostAllExceptions)
        let mode: Int32
        switch rm {
        case 1: mode = FE_TOWARDZERO
        case 2: mode = FE_DOWNWARD
        case 3: mode = FE_UPWARD
        default: mode = FE_TONEAREST
        }
        if mode != FE_TONEAREST { fesetround(mode) }
        let r = body()
        let e = fetestexcept(RISCVHart.hostAllExceptions)
        if mode != FE_TONEAREST { fesetround(FE_TONEAREST) }
        var flags: UInt64 = 0
        if e & FE_INEXACT != 0 { flags |= FFlag.nx }
        if e & FE_UNDERFLOW != 0 { flags |= FFlag.uf }
        if e & FE_OVERFLOW != 0 { flags |= FFlag.of }
        if e & FE_DIVBYZERO != 0 { flags |= FFlag.dz }
        if e & FE_INVALID != 0 { flags |= FFlag.nv }
        st.pointee.fflags |= flags
        return r
    }

    /// Loads, stores and OP-FP / fused instructions; false if it raised an exception.
    func executeFloat(_ d: DecodedInstruction) -> Bool {
        guard st.pointee.status & Status.fs != 0 else { illegal(d); return false }
        let rd = Int(d.rd), rs1 = Int(d.rs1), rs2 = Int(d.rs2)
        switch d.op {
        case .flw:
            guard let v = load(x[rs1] &+ UInt64(bitPattern: Int64(d.imm)), UInt32.self) else { return false }
            f[rd] = boxS(v)
        case .fld:
            guard let v = load(x[rs1] &+ UInt64(bitPattern: Int64(d.imm)), UInt64.self) else { return false }
            f[rd] = v
        case .fsw:
            guard store(x[rs1] &+ UInt64(bitPattern: Int64(d.imm)), UInt32(truncatingIfNeeded: f[rs2])) else { return false }
            return true  // stores leave FS unchanged
        case .fsd:
            guard store(x[rs1] &+ UInt64(bitPattern: Int64(d.imm)), f[rs2]) else { return false }
            return true
        default:
            guard executeFloatOp(d) else { illegal(d); return false }
        }
        st.pointee.status |= Status.fsDirty
        return true
    }

    /// Arithmetic; false for an illegal encoding (including a reserved rounding mode).
    private func executeFloatOp(_ d: DecodedInstruction) -> Bool {
        let raw = d.raw
        let rd = Int(d.rd), rs1 = Int(d.rs1), rs2 = Int(d.rs2), rs3 = Int(raw >> 27)
        let fmt = (raw >> 25) & 3
        guard fmt <= 1 else { return false }
        let double = fmt == 1
        var rm = UInt64((raw >> 12) & 7)
        let staticRM = rm
        if rm == 7 { rm = st.pointee.frm }
        let rmValid = rm <= 4
        let opcode = raw & 0x7f
        if opcode != 0x53 {
            // Fused multiply-add: fmadd, fmsub, fnmsub, fnmadd.
            guard rmValid else { return false }
            let negProduct = opcode == 0x4b || opcode == 0x4f
            let negAddend = opcode == 0x47 || opcode == 0x4f
            if double {
                var a = readD(rs1); let b = readD(rs2); var c = readD(rs3)
                if negProduct { a = -a }
                if negAddend { c = -c }
                writeD(rd, hostFP(rm) { fma(a, b, c) })
            } else {
                var a = readS(rs1); let b = readS(rs2); var c = readS(rs3)
                if negProduct { a = -a }
                if negAddend { c = -c }
                writeS(rd, hostFP(rm) { fmaf(a, b, c) })
            }
            return true
        }
        let funct5 = raw >> 27
        switch funct5 {
        case 0x00, 0x01, 0x02, 0x03:  // fadd fsub fmul fdiv
            guard rmValid else { return false }
            if double {
                let a = readD(rs1), b = readD(rs2)
                writeD(rd, hostFP(rm) { funct5 == 0 ? a + b : funct5 == 1 ? a - b : funct5 == 2 ? a * b : a / b })
            } else {
                let a = readS(rs1), b = readS(rs2)
                writeS(rd, hostFP(rm) { funct5 == 0 ? a + b : funct5 == 1 ? a - b : funct5 == 2 ? a * b : a / b })
            }
        case 0x0b:  // fsqrt
            guard rmValid, rs2 == 0 else { return false }
            if double { let a = readD(rs1); writeD(rd, hostFP(rm) { a.squareRoot() }) } else { let a = readS(rs1); writeS(rd, hostFP(rm) { a.squareRoot() }) }
        case 0x04:  // fsgnj, fsgnjn, fsgnjx
            guard staticRM <= 2 else { return false }
            if double {
                let a = f[rs1], b = f[rs2]
                let sign: UInt64 = staticRM == 0 ? b : staticRM == 1 ? ~b : a ^ b
                f[rd] = (a & ~(1 << 63)) | (sign & (1 << 63))
            } else {
                let a = readS(rs1).bitPattern, b = readS(rs2).bitPattern
                let sign: UInt32 = staticRM == 0 ? b : staticRM == 1 ? ~b : a ^ b
                f[rd] = boxS((a & ~(1 << 31)) | (sign & (1 << 31)))
            }
        case 0x05:  // fmin, fmax
            guard staticRM <= 1 else { return false }
            if double {
                f[rd] = minMax(readD(rs1), readD(rs2), max: staticRM == 1).bitPattern
            } else {
                f[rd] = boxS(minMax(readS(rs1), readS(rs2), max: staticRM == 1).bitPattern)
            }
        case 0x08:  // fcvt.s.d / fcvt.d.s
            guard rmValid else { return false }
            if double && rs2 == 0 {
                let a = readS(rs1)
                if a.isSignalingNaN { st.pointee.fflags |= FFlag.nv }
                writeD(rd, Double(a))
            } else if !double && rs2 == 1 {
                let a = readD(rs1)
                writeS(rd, hostFP(rm) { Float(a) })
            } else {
                return false
            }
        case 0x14:  // feq flt fle
            let r: Bool
            if double { guard let v = compare(readD(rs1), readD(rs2), staticRM) else { return false }; r = v } else { guard let v = compare(readS(rs1), readS(rs2), staticRM) else { return false }; r = v }
            x[rd] = r ? 1 : 0
            x[0] = 0
        case 0x18:  // fcvt.{w,wu,l,lu}.{s,d}
            guard rmValid, rs2 <= 3 else { return false }
            let v = double ? readD(rs1) : Double(readS(rs1))
            x[rd] = convertToInteger(v, kind: rs2, rm: rm)
            x[0] = 0
        case 0x1a:  // fcvt.{s,d}.{w,wu,l,lu}
            guard rmValid, rs2 <= 3 else { return false }
            let s = x[rs1]
            if double {
                let r: Double = hostFP(rm) {
                    switch rs2 {
                    case 0: Double(Int32(truncatingIfNeeded: s))
                    case 1: Double(UInt32(truncatingIfNeeded: s))
                    case 2: Double(Int64(bitPattern: s))
                    default: Double(s)
                    }
                }
                writeD(rd, r)
            } else {
                let r: Float = hostFP(rm) {
                    switch rs2 {
                    case 0: Float(Int32(truncatingIfNeeded: s))
                    case 1: Float(UInt32(truncatingIfNeeded: s))
                    case 2: Float(Int64(bitPattern: s))
                    default: Float(s)
                    }
                }
                writeS(rd, r)
            }
        case 0x1c:  // fmv.x.w / fmv.x.d, fclass
            guard rs2 == 0 else { return false }
            if staticRM == 0 {
                x[rd] = double ? f[rs1] : UInt64(bitPattern: Int64(Int32(truncatingIfNeeded: f[rs1])))
            } else if staticRM == 1 {
                x[rd] = double ? classify(readD(rs1)) : classify(readS(rs1))
            } else {
                return false
            }
            x[0] = 0
        case 0x1e:  // fmv.w.x / fmv.d.x
            guard rs2 == 0, staticRM == 0 else { return false }
            f[rd] = double ? x[rs1] : boxS(UInt32(truncatingIfNeeded: x[rs1]))
        default:
            return false
        }
        return true
    }

    /// fmin/fmax (F/D 2.2): -0 < +0; one NaN operand gives the other; sNaN raises NV.
    private func minMax<T: BinaryFloatingPoint>(_ a: T, _ b: T, max: Bool) -> T {
        if a.isSignalingNaN || b.isSignalingNaN { st.pointee.fflags |= FFlag.nv }
        if a.isNaN && b.isNaN { return T.nan }  // canonical quiet NaN (sign and payload zero)
        if a.isNaN { return b }
        if b.isNaN { return a }
        if a == b {  // ±0
            return max ? (a.sign == .minus ? b : a) : (a.sign == .minus ? a : b)
        }
        return max ? (a > b ? a : b) : (a < b ? a : b)
    }

    /// feq (quiet: NV only for sNaN), flt and fle (signalling: NV for any NaN).
    private func compare<T: BinaryFloatingPoint>(_ a: T, _ b: T, _ op: UInt64) -> Bool? {
        switch op {
        case 2:
            if a.isSignalingNaN || b.isSignalingNaN { st.pointee.fflags |= FFlag.nv }
            return a == b
        case 1:
            if a.isNaN || b.isNaN { st.pointee.fflags |= FFlag.nv; return false }
            return a < b
        case 0:
            if a.isNaN || b.isNaN { st.pointee.fflags |= FFlag.nv; return false }
            return a <= b
        default:
            return nil
        }
    }

    private func classify<T: BinaryFloatingPoint>(_ v: T) -> UInt64 {
        let neg = v.sign == .minus
        if v.isNaN { return v.isSignalingNaN ? 1 << 8 : 1 << 9 }
        if v.isInfinite { return neg ? 1 << 0 : 1 << 7 }
        if v.isZero { return neg ? 1 << 3 : 1 << 4 }
        if v.isSubnormal { return neg ? 1 << 2 : 1 << 5 }
        return neg ? 1 << 1 : 1 << 6
    }

    /// fcvt to integers: rounds by `rm`, saturates out-of-range values and NaN (to the
    /// maximum) with NV, raises NX for inexact results. `kind`: 0 w, 1 wu, 2 l, 3 lu.
    private func convertToInteger(_ v: Double, kind: Int, rm: UInt64) -> UInt64 {
        let lo: Double, hi: Double  // valid: lo <= r < hi
        let minResult: UInt64, maxResult: UInt64
        switch kind {
        case 0: lo = -2147483648.0; hi = 2147483648.0; minResult = UInt64(bitPattern: Int64(Int32.min)); maxResult = UInt64(Int32.max)
        case 1: lo = 0; hi = 4294967296.0; minResult = 0; maxResult = UInt64.max  // 0xffffffff sign-extended
        case 2: lo = -9223372036854775808.0; hi = 9223372036854775808.0; minResult = UInt64(bitPattern: Int64.min); maxResult = UInt64(Int64.max)
        default: lo = 0; hi = 18446744073709551616.0; minResult = 0; maxResult = UInt64.max
        }
        if v.isNaN { st.pointee.fflags |= FFlag.nv; return maxResult }
        let rule: FloatingPointRoundingRule
        switch rm {
        case 1: rule = .towardZero
        case 2: rule = .down
        case 3: rule = .up
        case 4: rule = .toNearestOrAwayFromZero
        default: rule = .toNearestOrEven
        }
        let r = v.rounded(rule)
        if r < lo { st.pointee.fflags |= FFlag.nv; return minResult }
        if r >= hi { st.pointee.fflags |= FFlag.nv; return maxResult }
        if r != v { st.pointee.fflags |= FFlag.nx }
        switch kind {
        case 0: return UInt64(bitPattern: Int64(Int32(r)))
        case 1: return UInt64(bitPattern: Int64(Int32(bitPattern: UInt32(r))))
        case 2: return UInt64(bitPattern: Int64(r))
        default: return UInt64(r)
        }
    }
}
