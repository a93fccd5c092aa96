import CKVM

/// Starts an x86 vCPU directly in 64-bit long mode, as a 64-bit boot protocol would leave
/// it (no real-mode firmware): a flat GDT, identity-mapped page tables covering the low
/// 4 GiB with 2 MiB pages, paging and long mode on, interrupts off.
///
/// ```
/// 0x1000  GDT: 0x00 null, 0x08 64-bit code (DPL 0), 0x10 data (flat 4 GiB)
/// 0x2000  PML4 (one entry)
/// 0x3000  PDPT (four entries)
/// 0x4000  four page directories, 512 × 2 MiB each: 0–4 GiB identity mapped;
///         the last GiB (MMIO) is mapped cache-disabled (PCD|PWT)
/// ```
/// Control registers: CR0 = PE|MP|ET|NE|WP|PG, CR4 = PAE|OSFXSR|OSXMMEXCPT (SSE usable),
/// EFER = LME|LMA, CR3 = 0x2000. RFLAGS = 0x2 (IF clear).
enum X86LongModeBoot {
    static let gdtAddress: UInt64 = 0x1000
    static let pml4Address: UInt64 = 0x2000
    static let pdptAddress: UInt64 = 0x3000
    static let pdAddress: UInt64 = 0x4000
    /// First byte past the tables.
    static let tablesEnd: UInt64 = 0x8000

    static let codeSelector: UInt16 = 0x08
    static let dataSelector: UInt16 = 0x10

    enum CR0 { static let pe: UInt64 = 1, mp: UInt64 = 1 << 1, et: UInt64 = 1 << 4, ne: UInt64 = 1 << 5, wp: UInt64 = 1 << 16, pg: UInt64 = 1 << 31 }
    enum CR4 { static let pae: UInt64 = 1 << 5, osfxsr: UInt64 = 1 << 9, osxmmexcpt: UInt64 = 1 << 10 }
    enum EFER { static let lme: UInt64 = 1 << 8, lma: UInt64 = 1 << 10 }
    enum PTE { static let present: UInt64 = 1, writable: UInt64 = 1 << 1, pwt: UInt64 = 1 << 3, pcd: UInt64 = 1 << 4, largePage: UInt64 = 1 << 7 }

    /// GDT descriptors: flat, base 0, limit 0xfffff pages.
    static let gdt: [UInt64] = [
        0,
        0x00af_9b00_0000_ffff,  // code: P, DPL 0, S, type 0xb (exec/read, accessed), L, G
        0x00cf_9300_0000_ffff,  // data: P, DPL 0, S, type 0x3 (read/write, accessed), D/B, G
    ]

    /// Writes the GDT and page tables into `ram` (which must cover 0…`tablesEnd`).
    /// - Throws: `.invalidArgument` when RAM does not start at 0 or is too small.
    static func writeTables(into ram: GuestRAM) throws {
        guard ram.contains(0, count: tablesEnd) else {
            throw MachineError(.invalidArgument, "x86 boot tables need RAM at 0x0–0x\(String(tablesEnd, radix: 16))", operation: "set up long mode")
        }
        func put(_ values: [UInt64], at address: UInt64) throws {
            // SAFETY: `values` is alive for the closure; `ram.write` checks the destination range.
            try values.withUnsafeBytes { try ram.write($0, at: address) }
        }
        try put(gdt, at: gdtAddress)
        try put([pdptAddress | PTE.present | PTE.writable], at: pml4Address)
        try put((0..<4).map { (pdAddress + UInt64($0) * 0x1000) | PTE.present | PTE.writable }, at: pdptAddress)
        for gib in 0..<4 {
            let uncached: UInt64 = gib == 3 ? PTE.pcd | PTE.pwt : 0
            let pd = (0..<512).map { (UInt64(gib) << 30) | (UInt64($0) << 21) | PTE.present | PTE.writable | PTE.largePage | uncached }
            try put(pd, at: pdAddress + UInt64(gib) * 0x1000)
        }
    }

    /// Puts `cpu` in long mode at `entry` with `stack` in RSP and `arguments` in RDI, RSI, RDX.
    static func start(_ cpu: KVMVCPU, entry: UInt64, stack: UInt64, arguments: (UInt64, UInt64, UInt64)) throws {
        var s = try cpu.specialRegisters()
        var code = kvm_segment()
        code.base = 0
        code.limit = 0xffff_ffff
        code.selector = codeSelector
        code.type = 0xb
        code.present = 1
        code.s = 1
        code.l = 1
        code.g = 1
        var data = code
        data.selector = dataSelector
        data.type = 0x3
        data.l = 0
        data.db = 1
        s.cs = code
        s.ds = data; s.es = data; s.fs = data; s.gs = data; s.ss = data
        s.gdt.base = gdtAddress
        s.gdt.limit = UInt16(gdt.count * 8 - 1)
        s.idt.base = 0
        s.idt.limit = 0  // no IDT: any exception becomes a triple fault, reported as a crash
        s.cr0 = CR0.pe | CR0.mp | CR0.et | CR0.ne | CR0.wp | CR0.pg
        s.cr3 = pml4Address
        s.cr4 = CR4.pae | CR4.osfxsr | CR4.osxmmexcpt
        s.efer = EFER.lme | EFER.lma
        try cpu.setSpecialRegisters(s)

        var r = kvm_regs()
        r.rip = entry
        r.rsp = stack
        r.rflags = 0x2
        r.rdi = arguments.0
        r.rsi = arguments.1
        r.rdx = arguments.2
        try cpu.setRegisters(r)
    }
}
