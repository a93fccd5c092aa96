/// Privilege levels (the encoding of sstatus.SPP / the privileged spec's levels).
enum Priv {
    static let user: UInt64 = 0
    static let supervisor: UInt64 = 1
}

/// sstatus bits (privileged spec, "Supervisor Status Register").
enum Status {
    static let sie: UInt64 = 1 << 1
    static let spie: UInt64 = 1 << 5
    static let spp: UInt64 = 1 << 8
    static let fs: UInt64 = 3 << 13
    static let fsDirty: UInt64 = 3 << 13
    static let sum: UInt64 = 1 << 18
    static let mxr: UInt64 = 1 << 19
    static let uxl64: UInt64 = 2 << 32
    static let sd: UInt64 = 1 << 63
    /// Bits S-mode can write.
    static let writable: UInt64 = sie | spie | spp | fs | sum | mxr
}

/// sip/sie bits.
enum Interrupt {
    static let ssi: UInt64 = 1 << 1
    static let sti: UInt64 = 1 << 5
    static let sei: UInt64 = 1 << 9
    static let mei: UInt64 = 1 << 11
    static let supervisorMask: UInt64 = ssi | sti | sei
}

/// Exception causes (scause values without the interrupt bit).
enum Cause {
    static let fetchMisaligned: UInt64 = 0
    static let fetchAccess: UInt64 = 1
    static let illegalInstruction: UInt64 = 2
    static let breakpoint: UInt64 = 3
    static let loadMisaligned: UInt64 = 4
    static let loadAccess: UInt64 = 5
    static let storeMisaligned: UInt64 = 6
    static let storeAccess: UInt64 = 7
    static let ecallFromU: UInt64 = 8
    static let ecallFromS: UInt64 = 9
    static let fetchPageFault: UInt64 = 12
    static let loadPageFault: UInt64 = 13
    static let storePageFault: UInt64 = 15
}

/// Architectural and bookkeeping state of one hart, kept in manually allocated memory.
struct HartState {
    var pc: UInt64 = 0
    var priv: UInt64 = Priv.supervisor
    /// sstatus bits in `Status.writable` (UXL and SD are added on read).
    var status: UInt64 = 0
    var sie: UInt64 = 0
    /// The software-writable part of sip (SSIP).
    var sipSoft: UInt64 = 0
    var stvec: UInt64 = 0
    var sscratch: UInt64 = 0
    var sepc: UInt64 = 0
    var scause: UInt64 = 0
    var stval: UInt64 = 0
    var satp: UInt64 = 0
    /// TM set at reset, as firmware-plus-Linux leave it on real boards: Linux sets
    /// scounteren only in its SBI PMU driver (which this SBI does not offer), and its vDSO
    /// reads `time` from U-mode.
    var scounteren: UInt64 = 0x2
    var senvcfg: UInt64 = 0
    var fflags: UInt64 = 0
    var frm: UInt64 = 0
    /// SBI set_timer deadline in `time` units; `.max` when none.
    var stimecmp: UInt64 = .max
    var reservation: UInt64 = .max
    var instret: UInt64 = 0

    /// Which TLB bank loads and stores use: 0 U-mode, 1 S-mode, 2 S-mode with SUM.
    var tlbMode: Int = 1
    /// Set by instructions after which the interpreter must leave its block.
    var endBlock = false
    /// Set when the current instruction raised an exception (the pc already points at the handler).
    var trapped = false
    var wfi = false
    var halted = false

    /// The virtual page the interpreter is fetching from (`.max`: none) and its decoded page.
    var fetchVBase: UInt64 = .max
    var fetchCode: UnsafeMutablePointer<DecodedInstruction>? = nil
    /// RAM page index of the fetch page.
    var fetchPage: Int = 0
}

/// One cached translation, for 4 KiB of virtual space: `host = va &+ addend`.
struct TLBEntry {
    /// Load/store banks: the page's virtual address (low 12 bits zero), so that one compare
    /// with `va & (~0xfff | (size - 1))` also sends misaligned accesses to the slow path.
    /// Fetch bank: the virtual page number. `.max` when the entry is empty.
    var tag: UInt64 = .max
    var addend: UInt64 = 0
    /// RAM page index of the physical page.
    var page: Int = 0

    static let sets = 256
    static let modes = 3
    /// Banks: load, store, fetch.
    static let kinds = 3
    static let total = sets * modes * kinds
    static let storeBank = sets * modes
    static let fetchBank = 2 * sets * modes
}

/// Kinds of memory access, for page-table permission checks and fault causes.
enum Access: Int {
    case load = 0, store = 1, fetch = 2

    var pageFault: UInt64 {
        switch self { case .load: Cause.loadPageFault; case .store: Cause.storePageFault; case .fetch: Cause.fetchPageFault }
    }
    var accessFault: UInt64 {
        switch self { case .load: Cause.loadAccess; case .store: Cause.storeAccess; case .fetch: Cause.fetchAccess }
    }
}

/// Interpreter operations; `undecoded` (0) marks an empty slot of the decoded-code cache.
enum Op: UInt8 {
    case undecoded = 0
    /// The two slots past the end of a decoded page: sequential execution ran off the page.
    case pageEnd
    case illegal
    case lui, auipc, jal, jalr, beq, bne, blt, bge, bltu, bgeu
    case lb, lh, lw, ld, lbu, lhu, lwu, sb, sh, sw, sd
    case addi, slti, sltiu, xori, ori, andi, slli, srli, srai
    case add, sub, sll, slt, sltu, xor, srl, sra, or, and
    case addiw, slliw, srliw, sraiw, addw, subw, sllw, srlw, sraw
    case mul, mulh, mulhsu, mulhu, div, divu, rem, remu, mulw, divw, divuw, remw, remuw
    case fence, fencei, ecall, ebreak, sret, wfi, sfencevma, csr
    case amo
    case flw, fld, fsw, fsd, fp
}

extension Op {
    /// Operations whose ``DecodedInstruction/imm`` holds the instruction bits instead of an
    /// immediate (their handlers decode the remaining fields from them).
    var carriesRaw: Bool {
        switch self {
        case .illegal, .csr, .amo, .fp, .ecall, .ebreak, .sret, .wfi, .sfencevma, .fence, .fencei, .pageEnd: true
        default: false
        }
    }
}

/// A decoded instruction (8 bytes, so the decoded copy of a hot 4 KiB code page fits in
/// 16 KiB of host cache). Compressed instructions decode to the operation of their 32-bit
/// expansion.
struct DecodedInstruction {
    var op: Op = .undecoded
    /// rd in bits 0-5, where x0 is 32 (a sink register, so writes need no x0 check);
    /// bit 7 set for a 4-byte instruction.
    var rdAndLength: UInt8 = 0
    var rs1: UInt8 = 0
    var rs2: UInt8 = 0
    /// The immediate, sign-extended; for operations that `carriesRaw`, the instruction bits.
    var imm: Int32 = 0

    @inline(__always) var rd: Int { Int(rdAndLength & 63) }
    @inline(__always) var length: UInt64 { 2 &+ UInt64((rdAndLength >> 6) & 2) }
    /// The instruction bits, for operations that `carriesRaw`.
    @inline(__always) var raw: UInt32 { UInt32(bitPattern: imm) }

    init() {}
    init(_ op: Op, rd: UInt32 = 0, rs1: UInt32 = 0, rs2: UInt32 = 0, imm: Int32 = 0, raw: UInt32, length: UInt8 = 4) {
        self.op = op
        let r = UInt8(truncatingIfNeeded: rd & 31)
        self.rdAndLength = (r == 0 ? 32 : r) | (length == 4 ? 0x80 : 0)
        self.rs1 = UInt8(truncatingIfNeeded: rs1)
        self.rs2 = UInt8(truncatingIfNeeded: rs2)
        self.imm = op.carriesRaw ? Int32(bitPattern: raw) : imm
    }
}
