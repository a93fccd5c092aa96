// F and D semantics: rounding modes, fflags, NaN boxing and canonical NaNs, fcvt
// saturation, fmin/fmax, comparisons, fclass, fused multiply-add, mstatus.FS.
import Foundation
import Testing
@testable import QMachine

@Suite(.enabled(if: RVAsm.available, Comment(rawValue: RVAsm.skipMessage)))
struct RISCVFloatTests {
    struct Case: CustomStringConvertible, Sendable {
        let name: String
        let code: String
        let result: UInt64
        let flags: UInt64
        var description: String { name }
    }

    static func d(_ v: Double) -> String { "0x" + String(v.bitPattern, radix: 16) }
    static func s(_ v: Float) -> String { "0x" + String(v.bitPattern, radix: 16) }
    static let one = s(1), tiny = s(0x1p-24)
    static let NV: UInt64 = 16, DZ: UInt64 = 8, OF: UInt64 = 4, NX: UInt64 = 1

    /// f1, f2, f3 are loaded with singles (`S`) or doubles (`D`), the operation leaves its
    /// integer result (or the raw bits of f0) in s2.
    static func S(_ a: String, _ b: String = "0", _ op: String, fmv: Bool = true) -> String {
        "li t0, \(a)\n  fmv.w.x f1, t0\n  li t0, \(b)\n  fmv.w.x f2, t0\n  \(op)\n" + (fmv ? "  fmv.x.d s2, f0\n" : "")
    }
    static func D(_ a: String, _ b: String = "0", _ c: String = "0", _ op: String, fmv: Bool = true) -> String {
        "li t0, \(a)\n  fmv.d.x f1, t0\n  li t0, \(b)\n  fmv.d.x f2, t0\n  li t0, \(c)\n  fmv.d.x f3, t0\n  \(op)\n" + (fmv ? "  fmv.x.d s2, f0\n" : "")
    }
    static let boxed: UInt64 = 0xFFFF_FFFF_0000_0000

    static let cases: [Case] = [
        // Rounding of 1 + 2^-24 (a tie) in single precision: static and dynamic modes.
        Case(name: "fadd.s rne", code: S(one, tiny, "fadd.s f0, f1, f2, rne"), result: boxed | 0x3f80_0000, flags: NX),
        Case(name: "fadd.s rtz", code: S(one, tiny, "fadd.s f0, f1, f2, rtz"), result: boxed | 0x3f80_0000, flags: NX),
        Case(name: "fadd.s rdn", code: S(one, tiny, "fadd.s f0, f1, f2, rdn"), result: boxed | 0x3f80_0000, flags: NX),
        Case(name: "fadd.s rup", code: S(one, tiny, "fadd.s f0, f1, f2, rup"), result: boxed | 0x3f80_0001, flags: NX),
        Case(name: "fadd.s dyn frm=rup", code: "fsrmi 3\n" + S(one, tiny, "fadd.s f0, f1, f2, dyn"), result: boxed | 0x3f80_0001, flags: NX),
        Case(name: "fsub.s -tiny rdn", code: S(s(-1), tiny, "fsub.s f0, f1, f2, rdn"), result: boxed | 0xbf80_0001, flags: NX),
        // fflags.
        Case(name: "fdiv.d 1/0", code: D(d(1), d(0), "0", "fdiv.d f0, f1, f2"), result: Double.infinity.bitPattern, flags: DZ),
        Case(name: "fdiv.d 0/0", code: D(d(0), d(0), "0", "fdiv.d f0, f1, f2"), result: 0x7ff8_0000_0000_0000, flags: NV),
        Case(name: "fdiv.d 1/3", code: D(d(1), d(3), "0", "fdiv.d f0, f1, f2"), result: (1.0 / 3.0).bitPattern, flags: NX),
        Case(name: "fmul.d overflow", code: D(d(.greatestFiniteMagnitude), d(2), "0", "fmul.d f0, f1, f2"), result: Double.infinity.bitPattern, flags: OF | NX),
        Case(name: "fsqrt.d -1", code: D(d(-1), "0", "0", "fsqrt.d f0, f1"), result: 0x7ff8_0000_0000_0000, flags: NV),
        Case(name: "fadd.d NaN payload is canonical", code: D("0x7ff8000000000123", d(1), "0", "fadd.d f0, f1, f2"), result: 0x7ff8_0000_0000_0000, flags: 0),
        Case(name: "fadd.d sNaN", code: D("0x7ff0000000000001", d(1), "0", "fadd.d f0, f1, f2"), result: 0x7ff8_0000_0000_0000, flags: NV),
        // NaN boxing.
        Case(name: "unboxed single reads as canonical NaN", code: "li t0, 0x3f800000\n fmv.d.x f1, t0\n fadd.s f0, f1, f1\n fmv.x.d s2, f0\n", result: boxed | 0x7fc0_0000, flags: 0),
        Case(name: "fmv.x.w sign-extends", code: S(s(-1), "0", "fmv.x.w s2, f1", fmv: false), result: 0xFFFF_FFFF_BF80_0000, flags: 0),
        Case(name: "fmv.w.x boxes", code: "li t0, 0x12345678\n fmv.w.x f0, t0\n fmv.x.d s2, f0\n", result: boxed | 0x1234_5678, flags: 0),
        Case(name: "flw boxes", code: "la t0, 1f\n flw f0, 0(t0)\n fmv.x.d s2, f0\n j 2f\n .balign 4\n1: .word 0x40490fdb\n2:\n", result: boxed | 0x4049_0fdb, flags: 0),
        Case(name: "fsgnjn.s of unboxed", code: "li t0, 1\n fmv.d.x f1, t0\n fsgnjn.s f0, f1, f1\n fmv.x.d s2, f0\n", result: boxed | 0xffc0_0000, flags: 0),
        Case(name: "fsgnjx.d", code: D(d(-2), d(-3), "0", "fsgnjx.d f0, f1, f2"), result: (2.0).bitPattern, flags: 0),
        // fcvt to integers: rounding, saturation, NV and NX.
        Case(name: "fcvt.w.d 1e20", code: D(d(1e20), "0", "0", "fcvt.w.d s2, f1", fmv: false), result: 0x7fff_ffff, flags: NV),
        Case(name: "fcvt.w.d -1e20", code: D(d(-1e20), "0", "0", "fcvt.w.d s2, f1", fmv: false), result: 0xFFFF_FFFF_8000_0000, flags: NV),
        Case(name: "fcvt.w.d NaN", code: D("0x7ff8000000000000", "0", "0", "fcvt.w.d s2, f1", fmv: false), result: 0x7fff_ffff, flags: NV),
        Case(name: "fcvt.wu.d -1", code: D(d(-1), "0", "0", "fcvt.wu.d s2, f1", fmv: false), result: 0, flags: NV),
        Case(name: "fcvt.wu.d -0.5 rtz", code: D(d(-0.5), "0", "0", "fcvt.wu.d s2, f1, rtz", fmv: false), result: 0, flags: NX),
        Case(name: "fcvt.wu.d 2^32-1", code: D(d(4294967295), "0", "0", "fcvt.wu.d s2, f1", fmv: false), result: .max, flags: 0),
        Case(name: "fcvt.lu.d 2^64", code: D(d(0x1p64), "0", "0", "fcvt.lu.d s2, f1", fmv: false), result: .max, flags: NV),
        Case(name: "fcvt.l.s -inf", code: S(s(-.infinity), "0", "fcvt.l.s s2, f1", fmv: false), result: 0x8000_0000_0000_0000, flags: NV),
        Case(name: "fcvt.w.d 2.5 rne", code: D(d(2.5), "0", "0", "fcvt.w.d s2, f1, rne", fmv: false), result: 2, flags: NX),
        Case(name: "fcvt.w.d 2.5 rmm", code: D(d(2.5), "0", "0", "fcvt.w.d s2, f1, rmm", fmv: false), result: 3, flags: NX),
        Case(name: "fcvt.w.d -2.5 rmm", code: D(d(-2.5), "0", "0", "fcvt.w.d s2, f1, rmm", fmv: false), result: UInt64(bitPattern: -3), flags: NX),
        Case(name: "fcvt.w.d -2.5 rdn", code: D(d(-2.5), "0", "0", "fcvt.w.d s2, f1, rdn", fmv: false), result: UInt64(bitPattern: -3), flags: NX),
        Case(name: "fcvt.w.d 2.5 rup", code: D(d(2.5), "0", "0", "fcvt.w.d s2, f1, rup", fmv: false), result: 3, flags: NX),
        Case(name: "fcvt.l.d exact", code: D(d(-42), "0", "0", "fcvt.l.d s2, f1", fmv: false), result: UInt64(bitPattern: -42), flags: 0),
        // fcvt from integers and between formats.
        Case(name: "fcvt.s.l 2^24+1", code: "li t0, 16777217\n fcvt.s.l f0, t0\n fmv.x.d s2, f0\n", result: boxed | 0x4b80_0000, flags: NX),
        Case(name: "fcvt.s.lu max rup", code: "li t0, -1\n fcvt.s.lu f0, t0, rup\n fmv.x.d s2, f0\n", result: boxed | 0x5f80_0000, flags: NX),
        Case(name: "fcvt.d.wu", code: "li t0, -1\n fcvt.d.wu f0, t0\n fmv.x.d s2, f0\n", result: (4294967295.0).bitPattern, flags: 0),
        Case(name: "fcvt.s.d rounds", code: D(d(1.0 + 0x1p-30), "0", "0", "fcvt.s.d f0, f1"), result: boxed | 0x3f80_0000, flags: NX),
        Case(name: "fcvt.d.s sNaN", code: S("0x7f800001", "0", "fcvt.d.s f0, f1"), result: 0x7ff8_0000_0000_0000, flags: NV),
        // fmin/fmax and comparisons.
        Case(name: "fmin.d -0 +0", code: D(d(-0.0), d(0), "0", "fmin.d f0, f2, f1"), result: (-0.0).bitPattern, flags: 0),
        Case(name: "fmax.d -0 +0", code: D(d(-0.0), d(0), "0", "fmax.d f0, f1, f2"), result: (0.0).bitPattern, flags: 0),
        Case(name: "fmin.d qNaN 1", code: D("0x7ff8000000000000", d(1), "0", "fmin.d f0, f1, f2"), result: (1.0).bitPattern, flags: 0),
        Case(name: "fmax.d sNaN 1", code: D("0x7ff0000000000001", d(1), "0", "fmax.d f0, f1, f2"), result: (1.0).bitPattern, flags: NV),
        Case(name: "fmin.s NaN NaN", code: S("0x7fc00001", "0xffc00000", "fmin.s f0, f1, f2"), result: boxed | 0x7fc0_0000, flags: 0),
        Case(name: "feq.d qNaN quiet", code: D("0x7ff8000000000000", d(1), "0", "feq.d s2, f1, f2", fmv: false), result: 0, flags: 0),
        Case(name: "feq.d sNaN", code: D("0x7ff0000000000001", d(1), "0", "feq.d s2, f1, f2", fmv: false), result: 0, flags: NV),
        Case(name: "flt.d qNaN signals", code: D("0x7ff8000000000000", d(1), "0", "flt.d s2, f1, f2", fmv: false), result: 0, flags: NV),
        Case(name: "fle.s", code: S(s(-0.0), s(0), "fle.s s2, f1, f2", fmv: false), result: 1, flags: 0),
        // fclass.
        Case(name: "fclass -inf", code: D(d(-.infinity), "0", "0", "fclass.d s2, f1", fmv: false), result: 1, flags: 0),
        Case(name: "fclass -normal", code: D(d(-1), "0", "0", "fclass.d s2, f1", fmv: false), result: 2, flags: 0),
        Case(name: "fclass -subnormal", code: D("0x8000000000000001", "0", "0", "fclass.d s2, f1", fmv: false), result: 4, flags: 0),
        Case(name: "fclass -0", code: D(d(-0.0), "0", "0", "fclass.d s2, f1", fmv: false), result: 8, flags: 0),
        Case(name: "fclass +0", code: D(d(0), "0", "0", "fclass.d s2, f1", fmv: false), result: 16, flags: 0),
        Case(name: "fclass +subnormal", code: S("0x00000001", "0", "fclass.s s2, f1", fmv: false), result: 32, flags: 0),
        Case(name: "fclass +normal", code: S(s(1), "0", "fclass.s s2, f1", fmv: false), result: 64, flags: 0),
        Case(name: "fclass +inf", code: S(s(.infinity), "0", "fclass.s s2, f1", fmv: false), result: 128, flags: 0),
        Case(name: "fclass sNaN", code: S("0x7f800001", "0", "fclass.s s2, f1", fmv: false), result: 256, flags: 0),
        Case(name: "fclass qNaN", code: S("0x7fc00000", "0", "fclass.s s2, f1", fmv: false), result: 512, flags: 0),
        // Fused multiply-add: one rounding.
        Case(name: "fmadd.d fused", code: D(d(1 + 0x1p-30), d(1 + 0x1p-30), d(-(1 + 0x1p-29)), "fmadd.d f0, f1, f2, f3"), result: (0x1p-60).bitPattern, flags: 0),
        Case(name: "fmsub.d", code: D(d(2), d(3), d(1), "fmsub.d f0, f1, f2, f3"), result: (5.0).bitPattern, flags: 0),
        Case(name: "fnmsub.d", code: D(d(2), d(3), d(1), "fnmsub.d f0, f1, f2, f3"), result: (-5.0).bitPattern, flags: 0),
        Case(name: "fnmadd.d", code: D(d(2), d(3), d(1), "fnmadd.d f0, f1, f2, f3"), result: (-7.0).bitPattern, flags: 0),
        Case(name: "fmadd.s", code: "li t0, 0x40000000\n fmv.w.x f1, t0\n li t0, 0x40400000\n fmv.w.x f2, t0\n li t0, 0x3f800000\n fmv.w.x f3, t0\n fmadd.s f0, f1, f2, f3\n fmv.x.d s2, f0\n", result: boxed | 0x40e0_0000, flags: 0),
    ]

    @Test(arguments: cases) func floatingPoint(_ c: Case) throws {
        let (m, exit) = try RVAsm.run("FPON\n  csrwi fflags, 0\n  " + c.code + "\n  csrr s3, fflags\n")
        #expect(exit == .shutdown)
        #expect(m.x(s10) == 0, "no trap (scause \(m.x(s10)))")
        #expect(m.x(s2) == c.result, "\(c.name): 0x\(String(m.x(s2), radix: 16)), expected 0x\(String(c.result, radix: 16))")
        #expect(m.x(s3) == c.flags, "\(c.name): fflags \(m.x(s3)), expected \(c.flags)")
    }

    @Test func fsOffTrapsAndFPUseMakesStateDirty() throws {
        let (m1, _) = try RVAsm.run("fadd.d f0, f1, f2")
        #expect(m1.x(s10) == 2 && m1.x(s11) == 0x0220_f053, "FP instruction with FS=Off is illegal")
        let (m2, _) = try RVAsm.run("csrr t0, fflags")
        #expect(m2.x(s10) == 2, "fflags with FS=Off is illegal")
        let (m3, exit) = try RVAsm.run("""
          li t0, 0x2000
          csrs sstatus, t0
          csrr s2, sstatus
          fmv.d.x f1, zero
          csrr s3, sstatus
          li t0, 0x6000
          csrc sstatus, t0
          csrr s4, sstatus
          li t0, 0x60
          csrw fcsr, t0
        """)
        #expect(exit == .shutdown)
        #expect(m3.x(s2) & 0x6000 == 0x2000 && m3.x(s2) >> 63 == 0, "FS=Initial, SD clear")
        #expect(m3.x(s3) & 0x6000 == 0x6000 && m3.x(s3) >> 63 == 1, "FS=Dirty and SD after an FP write")
        #expect(m3.x(s4) & 0x6000 == 0 && m3.x(s10) == 2, "FS=Off again: fcsr traps")
    }

    @Test func compressedFloatLoadsAndStores() throws {
        let (m, exit) = try RVAsm.run("""
          FPON
          .option rvc
          la s0, buf
          c.fld f8, 0(s0)
          c.fsd f8, 8(s0)
          addi sp, sp, -16
          c.fsdsp f8, 0(sp)
          c.fldsp f9, 0(sp)
          .option norvc
          fmv.x.d s2, f9
          ld s3, 8(s0)
          j 1f
        .balign 8
        buf: .dword 0x400921fb54442d18, 0
        1:
        """)
        #expect(exit == .shutdown)
        #expect(m.x(s2) == 0x4009_21fb_5444_2d18)
        #expect(m.x(s3) == 0x4009_21fb_5444_2d18)
    }
}
