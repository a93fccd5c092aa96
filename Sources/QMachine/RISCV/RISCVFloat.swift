#if canImport(Glibc)
import Glibc
#endif

/// fflags bits.
enum FFlag {
    static let nx: UInt64 = 1, uf: UInt64 = 2, of: UInt64 = 4, dz: UInt64 = 8, nv: UInt64 = 16
}

/// The F and D extensions. Arithmetic runs on the host FPU under the guest's rounding mode
/// (round-to-nearest-max-magnitude, which hosts lack, is derived from a wider computation:
/// see `fpResult`), host exception flags become fflags, and NaN results are the RISC-V
/// canonical NaN. Comparisons, min/max, sign injection, classification and
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
        // Ordering with the fenv calls: `body` reads its operands from guest register memory,
        // which those external calls might write, so the operation cannot move above them;
        // its result is stored to memory they might read, so it cannot move below them.
        let r = body()
        // SAFETY: `fpSink` is this hart's own 16-byte, 16-aligned scratch (allocated in init, freed in
        // deinit); T is at most 8 bytes.
        fpSink.storeBytes(of: r, as: T.self)
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

    // MARK: Round to nearest, ties to max magnitude (RMM)

    #if arch(x86_64)
    typealias WideDouble = Float80
    @inline(__always) func wideFMA(_ a: WideDouble, _ b: WideDouble, _ c: WideDouble) -> WideDouble { fmal(a, b, c) }
    #else
    typealias WideDouble = Double  // unused: RMM falls back to RNE
    @inline(__always) func wideFMA(_ a: WideDouble, _ b: WideDouble, _ c: WideDouble) -> WideDouble { fma(a, b, c) }
    #endif

    /// An F/D result under guest rounding mode `rm`. Hosts have no RMM: for it, the flags come
    /// from the round-to-nearest-even computation (`body`; NX, OF and UF agree), and the value
    /// from `wide` — the operation computed toward zero in a format with at least two more
    /// bits of precision, so the comparison with the midpoint is exact — rounded with ties
    /// away from zero. Without a wide format (non-x86 hosts) RMM behaves as RNE.
    @inline(__always) func fpResult<T: BinaryFloatingPoint, W: BinaryFloatingPoint>(_ rm: UInt64, _ body: () -> T, wide: () -> W) -> T {
        let r = hostFP(rm, body)
        #if arch(x86_64)
        guard rm == 4, !r.isNaN else { return r }
        fesetround(FE_TOWARDZERO)
        let w = wide()
        let lo = T(w)
        // SAFETY: `fpSink` holds 16 bytes, aligned to 16; W and T are at most 16 bytes.
        fpSink.storeBytes(of: w, as: W.self)
        fpSink.storeBytes(of: lo, toByteOffset: 0, as: T.self)
        fesetround(FE_TONEAREST)
        if w.isInfinite || W(lo) == w { return lo }
        let hi = w < 0 ? lo.nextDown : lo.nextUp
        let halfUlp = W(lo.ulp) / 2
        let midpoint = hi.isInfinite ? W(lo) + (w < 0 ? -halfUlp : halfUlp) : (W(lo) + W(hi)) / 2
        return w.magnitude >= midpoint.magnitude ? hi : lo
        #else
        return r
        #endif
    }

    /// Loads, stores and OP-FP / fused instructions; false if it raised an exception.
    func executeFloat(_ d: DecodedInstruction) -> Bool {
        guard st.pointee.status & Status.fs != 0 else { illegal(d); return false }
        let rd = d.rd & 31, rs1 = Int(d.rs1), rs2 = Int(d.rs2)  // rd names an f register
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
        // f destinations use rd; integer destinations use xrd (x0 is the sink, 32).
        let rd = d.rd & 31, xrd = d.rd, rs1 = Int(d.rs1), rs2 = Int(d.rs2), rs3 = Int(raw >> 27)
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
                writeD(rd, fpResult(rm, {
                    let a = readD(rs1), b = readD(rs2), c = readD(rs3)
                    return fma(negProduct ? -a : a, b, negAddend ? -c : c)
                }, wide: {
                    let a = WideDouble(readD(rs1)), b = WideDouble(readD(rs2)), c = WideDouble(readD(rs3))
                    return wideFMA(negProduct ? -a : a, b, negAddend ? -c : c)
                }))
            } else {
                writeS(rd, fpResult(rm, {
                    let a = readS(rs1), b = readS(rs2), c = readS(rs3)
                    return fmaf(negProduct ? -a : a, b, negAddend ? -c : c)
                }, wide: {
                    let a = Double(readS(rs1)), b = Double(readS(rs2)), c = Double(readS(rs3))
                    return fma(negProduct ? -a : a, b, negAddend ? -c : c)
                }))
            }
            return true
        }
        let funct5 = raw >> 27
        switch funct5 {
        case 0x00, 0x01, 0x02, 0x03:  // fadd fsub fmul fdiv
            guard rmValid else { return false }
            if double {
                writeD(rd, fpResult(rm, {
                    let a = readD(rs1), b = readD(rs2)
                    return funct5 == 0 ? a + b : funct5 == 1 ? a - b : funct5 == 2 ? a * b : a / b
                }, wide: {
                    let a = WideDouble(readD(rs1)), b = WideDouble(readD(rs2))
                    return funct5 == 0 ? a + b : funct5 == 1 ? a - b : funct5 == 2 ? a * b : a / b
                }))
            } else {
                writeS(rd, fpResult(rm, {
                    let a = readS(rs1), b = readS(rs2)
                    return funct5 == 0 ? a + b : funct5 == 1 ? a - b : funct5 == 2 ? a * b : a / b
                }, wide: {
                    let a = Double(readS(rs1)), b = Double(readS(rs2))
                    return funct5 == 0 ? a + b : funct5 == 1 ? a - b : funct5 == 2 ? a * b : a / b
                }))
            }
        case 0x0b:  // fsqrt
            guard rmValid, rs2 == 0 else { return false }
            if double {
                writeD(rd, fpResult(rm, { readD(rs1).squareRoot() }, wide: { WideDouble(readD(rs1)).squareRoot() }))
            } else {
                writeS(rd, fpResult(rm, { readS(rs1).squareRoot() }, wide: { Double(readS(rs1)).squareRoot() }))
            }
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
                writeS(rd, fpResult(rm, { Float(readD(rs1)) }, wide: { readD(rs1) }))
            } else {
                return false
            }
        case 0x14:  // feq flt fle
            let r: Bool
            if double { guard let v = compare(readD(rs1), readD(rs2), staticRM) else { return false }; r = v } else { guard let v = compare(readS(rs1), readS(rs2), staticRM) else { return false }; r = v }
            x[xrd] = r ? 1 : 0
        case 0x18:  // fcvt.{w,wu,l,lu}.{s,d}
            guard rmValid, rs2 <= 3 else { return false }
            let v = double ? readD(rs1) : Double(readS(rs1))
            x[xrd] = convertToInteger(v, kind: rs2, rm: rm)
        case 0x1a:  // fcvt.{s,d}.{w,wu,l,lu}
            guard rmValid, rs2 <= 3 else { return false }
            // Integers convert exactly to the wide format (64-bit significand).
            func wideValue() -> WideDouble {
                let v = x[rs1]
                return switch rs2 {
                case 0: WideDouble(Int32(truncatingIfNeeded: v))
                case 1: WideDouble(UInt32(truncatingIfNeeded: v))
                case 2: WideDouble(Int64(bitPattern: v))
                default: WideDouble(v)
                }
            }
            if double {
                writeD(rd, fpResult(rm, {
                    let v = x[rs1]
                    return switch rs2 {
                    case 0: Double(Int32(truncatingIfNeeded: v))
                    case 1: Double(UInt32(truncatingIfNeeded: v))
                    case 2: Double(Int64(bitPattern: v))
                    default: Double(v)
                    }
                }, wide: wideValue))
            } else {
                writeS(rd, fpResult(rm, {
                    let v = x[rs1]
                    return switch rs2 {
                    case 0: Float(Int32(truncatingIfNeeded: v))
                    case 1: Float(UInt32(truncatingIfNeeded: v))
                    case 2: Float(Int64(bitPattern: v))
                    default: Float(v)
                    }
                }, wide: wideValue))
            }
        case 0x1c:  // fmv.x.w / fmv.x.d, fclass
            guard rs2 == 0 else { return false }
            if staticRM == 0 {
                x[xrd] = double ? f[rs1] : UInt64(bitPattern: Int64(Int32(truncatingIfNeeded: f[rs1])))
            } else if staticRM == 1 {
                x[xrd] = double ? classify(readD(rs1)) : classify(readS(rs1))
            } else {
                return false
            }
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
