#if canImport(Glibc)
import Glibc
#endif

/// Decoded instructions cached per guest-physical RAM page: 2048 slots of
/// ``DecodedInstruction`` per 4 KiB (one per 2-byte offset), filled lazily, and two
/// `.pageEnd` slots after them, where sequential execution off the end of the page lands
/// (so the interpreter checks page bounds only on jumps and branches).
///
/// A page "has code" once the hart fetched from it; stores to such a page (by the hart, or
/// DMA reported through ``RISCVHart/invalidateCode(physicalAddress:length:)``) empty it.
/// The cache is therefore always coherent with RAM, and `fence.i` has nothing to discard.
final class CodeCache {
    static let slots = 2048
    /// Slots allocated per page: `slots` and the two `.pageEnd` sentinels.
    static let allocated = slots + 2
    let ramBase: UInt64
    let pageCount: Int
    let pages: UnsafeMutablePointer<UnsafeMutablePointer<DecodedInstruction>?>
    let hasCode: UnsafeMutablePointer<Bool>

    init(ramBase: UInt64, ramSize: UInt64) {
        self.ramBase = ramBase
        pageCount = Int(ramSize >> 12)
        pages = .allocate(capacity: pageCount)
        pages.initialize(repeating: nil, count: pageCount)
        hasCode = .allocate(capacity: pageCount)
        hasCode.initialize(repeating: false, count: pageCount)
    }

    deinit {
        for i in 0..<pageCount { pages[i]?.deallocate() }
        pages.deallocate(); hasCode.deallocate()
    }

    /// The decoded page for RAM page `i`.
    @inline(__always) func page(_ i: Int) -> UnsafeMutablePointer<DecodedInstruction> {
        if let p = pages[i] { return p }
        let p = UnsafeMutablePointer<DecodedInstruction>.allocate(capacity: CodeCache.allocated)
        clear(p)
        CodeCache.setSentinels(p + CodeCache.slots)
        pages[i] = p
        return p
    }

    @inline(__always) func clear(_ p: UnsafeMutablePointer<DecodedInstruction>) {
        memset(p, 0, CodeCache.slots * MemoryLayout<DecodedInstruction>.stride)
    }

    /// Writes the two `.pageEnd` slots at `p`.
    static func setSentinels(_ p: UnsafeMutablePointer<DecodedInstruction>) {
        var end = DecodedInstruction()
        end.op = .pageEnd
        p.initialize(repeating: end, count: 2)
    }

    /// Empties RAM page `i` (a store hit it).
    func invalidate(_ i: Int) {
        hasCode[i] = false
        if let p = pages[i] { clear(p) }
    }
}

extension RISCVHart {
    // MARK: Translation

    /// Translates a virtual address for `access`, raising the page fault (or access fault) on
    /// failure and returning nil. Sets A and D bits in the page tables as hardware does (Svadu).
    @inline(never)
    func translate(_ va: UInt64, _ access: Access) -> UInt64? {
        let satp = st.pointee.satp
        let mode = satp >> 60
        if mode == 0 { return va }
        let levels = mode == 9 ? 4 : 3
        let vaBits = UInt64(12 + 9 * levels)
        // The upper bits must all equal bit vaBits-1.
        let top = Int64(bitPattern: va) >> (vaBits - 1)
        guard top == 0 || top == -1 else { return pageFault(va, access) }
        var table = (satp & ((1 << 44) - 1)) << 12
        var level = levels - 1
        while true {
            let pteAddress = table &+ ((va >> (12 + 9 * UInt64(level))) & 511) &* 8
            guard let ptePointer = ram.pointer(at: pteAddress, count: 8) else {
                raise(access.accessFault, tval: va)
                return nil
            }
            var pte = ptePointer.load(as: UInt64.self)
            let v = pte & 1, r = (pte >> 1) & 1, w = (pte >> 2) & 1, xb = (pte >> 3) & 1
            if v == 0 || (r == 0 && w == 1) || pte >> 54 != 0 { return pageFault(va, access) }
            if r == 0 && xb == 0 {
                // Pointer to the next level.
                if level == 0 { return pageFault(va, access) }
                table = ((pte >> 10) & ((1 << 44) - 1)) << 12
                level -= 1
                continue
            }
            // Leaf: permissions.
            let u = (pte >> 4) & 1
            let priv = st.pointee.priv
            if priv == Priv.user {
                if u == 0 { return pageFault(va, access) }
            } else if u == 1 {
                if access == .fetch || st.pointee.status & Status.sum == 0 { return pageFault(va, access) }
            }
            switch access {
            case .fetch: if xb == 0 { return pageFault(va, access) }
            case .load: if r == 0 && !(xb == 1 && st.pointee.status & Status.mxr != 0) { return pageFault(va, access) }
            case .store: if w == 0 { return pageFault(va, access) }
            }
            let ppn = (pte >> 10) & ((1 << 44) - 1)
            let superMask: UInt64 = (1 << (9 * UInt64(level))) - 1
            if ppn & superMask != 0 { return pageFault(va, access) }  // misaligned superpage
            // Hardware A/D update.
            var want = pte | (1 << 6)
            if access == .store { want |= 1 << 7 }
            if want != pte {
                pte = want
                // SAFETY: `ptePointer` came from `ram.pointer(at:count: 8)`, which checked the PTE is
                // inside RAM.
                ptePointer.storeBytes(of: pte, as: UInt64.self)
            }
            let pageOffsetMask: UInt64 = (1 << (12 + 9 * UInt64(level))) - 1
            return (ppn << 12) & ~pageOffsetMask | (va & pageOffsetMask)
        }
    }

    private func pageFault(_ va: UInt64, _ access: Access) -> UInt64? {
        raise(access.pageFault, tval: va)
        return nil
    }

    /// Empties the TLB and the fetch page (sfence.vma, satp and sstatus.MXR writes).
    func flushTLB() {
        for i in 0..<TLBEntry.total { tlb[i].tag = .max }
        st.pointee.fetchVBase = .max
    }

    /// Marks the fetch page as holding decoded code, so that stores to it empty it (their
    /// store TLB entries, which skip that check, are dropped).
    @inline(__always)
    func watchFetchPage() {
        let page = st.pointee.fetchPage
        if !code.hasCode[page] {
            code.hasCode[page] = true
            dropStoreEntries(page: page)
        }
    }

    /// Removes store entries that point at RAM page `page` (it now holds decoded code).
    func dropStoreEntries(page: Int) {
        for i in TLBEntry.storeBank..<TLBEntry.fetchBank where tlb[i].page == page { tlb[i].tag = .max }
    }

    /// fence.i and SBI remote_fence_i. The decoded-code cache is already coherent (stores
    /// by this hart to pages with decoded code empty them), so this only applies the DMA
    /// invalidations devices reported, at once rather than at the next block boundary.
    /// Discarding all decoded code here instead would be costly: Linux 6.12 issues about
    /// 41,000 fence.i while booting (ftrace and jump-label patching), and doing so took ~10%
    /// of the boot's time.
    func instructionFence() {
        if attention.load(ordering: .relaxed) {
            let ranges = pendingInvalidations.withLock { r -> [(UInt64, UInt64)] in let c = r; r.removeAll(); return c }
            for (a, n) in ranges { invalidatePhysical(a, n) }
        }
        st.pointee.fetchVBase = .max
    }

    /// Empties decoded code for a guest-physical range (DMA).
    func invalidatePhysical(_ address: UInt64, _ length: UInt64) {
        let lo = max(address, ram.base), hi = min(address &+ length, ram.base &+ ram.size)
        guard lo < hi else { return }
        var p = Int((lo - ram.base) >> 12)
        let last = Int((hi - 1 - ram.base) >> 12)
        while p <= last {
            if code.hasCode[p] { code.invalidate(p) }
            p += 1
        }
        st.pointee.fetchVBase = .max
    }

    // MARK: Loads

    @inline(__always)
    func load<T: FixedWidthInteger>(_ va: UInt64, _: T.Type) -> T? {
        let e = tlb + (st.pointee.tlbMode << 8 | Int((va >> 12) & 255))
        if e.pointee.tag == va & (~0xfff | UInt64(MemoryLayout<T>.size - 1)) {
            return UnsafeRawPointer(bitPattern: UInt(va &+ e.pointee.addend)).unsafelyUnwrapped.loadUnaligned(as: T.self)
        }
        guard let v = loadSlow(va, MemoryLayout<T>.size) else { return nil }
        return T(truncatingIfNeeded: v)
    }

    /// `load` for the interpreter loop, which keeps the pc in a register: it is stored
    /// for the trap only on the slow path.
    @inline(__always)
    func load<T: FixedWidthInteger>(_ va: UInt64, _: T.Type, pc: UInt64) -> T? {
        let e = tlb + (st.pointee.tlbMode << 8 | Int((va >> 12) & 255))
        if e.pointee.tag == va & (~0xfff | UInt64(MemoryLayout<T>.size - 1)) {
            return UnsafeRawPointer(bitPattern: UInt(va &+ e.pointee.addend)).unsafelyUnwrapped.loadUnaligned(as: T.self)
        }
        st.pointee.pc = pc
        guard let v = loadSlow(va, MemoryLayout<T>.size) else { return nil }
        return T(truncatingIfNeeded: v)
    }

    @inline(never)
    func loadSlow(_ va: UInt64, _ size: Int) -> UInt64? {
        if Int(va & 0xfff) + size > 4096 {
            // Misaligned across pages: byte by byte (emulated, as the spec allows).
            var v: UInt64 = 0
            for i in 0..<size {
                guard let b = loadSlow(va &+ UInt64(i), 1) else { return nil }
                v |= b << (8 * UInt64(i))
            }
            return v
        }
        let hit = tlb + (st.pointee.tlbMode << 8 | Int((va >> 12) & 255))
        if hit.pointee.tag == va & ~0xfff {  // misaligned inside a mapped page
            let host = UnsafeRawPointer(bitPattern: UInt(va &+ hit.pointee.addend)).unsafelyUnwrapped
            switch size {
            case 1: return UInt64(host.load(as: UInt8.self))
            case 2: return UInt64(host.loadUnaligned(as: UInt16.self))
            case 4: return UInt64(host.loadUnaligned(as: UInt32.self))
            default: return host.loadUnaligned(as: UInt64.self)
            }
        }
        guard let pa = translate(va, .load) else { return nil }
        if let host = ram.pointer(at: pa, count: UInt64(size)) {
            let e = tlb + (st.pointee.tlbMode << 8 | Int((va >> 12) & 255))
            e.pointee.tag = va & ~0xfff
            e.pointee.addend = UInt64(UInt(bitPattern: host)) &- va
            e.pointee.page = Int((pa - ram.base) >> 12)
            switch size {
            case 1: return UInt64(host.load(as: UInt8.self))
            case 2: return UInt64(host.loadUnaligned(as: UInt16.self))
            case 4: return UInt64(host.loadUnaligned(as: UInt32.self))
            default: return host.loadUnaligned(as: UInt64.self)
            }
        }
        if let (device, offset) = bus.find(pa, size: size) {
            return device.read(offset: offset, size: size)
        }
        raise(Cause.loadAccess, tval: va)
        return nil
    }

    // MARK: Stores

    @inline(__always)
    func store<T: FixedWidthInteger>(_ va: UInt64, _ value: T) -> Bool {
        let e = tlb + (TLBEntry.storeBank + (st.pointee.tlbMode << 8 | Int((va >> 12) & 255)))
        if e.pointee.tag == va & (~0xfff | UInt64(MemoryLayout<T>.size - 1)) {
            // SAFETY: a TLB hit whose tag includes the low bits means the access is naturally aligned
            // and inside one page that was mapped to guest RAM (`addend` was set from a checked
            // `ram.pointer`).
            UnsafeMutableRawPointer(bitPattern: UInt(va &+ e.pointee.addend)).unsafelyUnwrapped.storeBytes(of: value, as: T.self)
            return true
        }
        return storeSlow(va, UInt64(truncatingIfNeeded: value), MemoryLayout<T>.size)
    }

    /// `store` for the interpreter loop (see `load(_:_:pc:)`).
    @inline(__always)
    func store<T: FixedWidthInteger>(_ va: UInt64, _ value: T, pc: UInt64) -> Bool {
        let e = tlb + (TLBEntry.storeBank + (st.pointee.tlbMode << 8 | Int((va >> 12) & 255)))
        if e.pointee.tag == va & (~0xfff | UInt64(MemoryLayout<T>.size - 1)) {
            // SAFETY: as in `store(_:_:)` above: a tag hit means an aligned access within a checked RAM
            // page.
            UnsafeMutableRawPointer(bitPattern: UInt(va &+ e.pointee.addend)).unsafelyUnwrapped.storeBytes(of: value, as: T.self)
            return true
        }
        st.pointee.pc = pc
        return storeSlow(va, UInt64(truncatingIfNeeded: value), MemoryLayout<T>.size)
    }

    @inline(never)
    func storeSlow(_ va: UInt64, _ value: UInt64, _ size: Int) -> Bool {
        if Int(va & 0xfff) + size > 4096 {
            // Check both pages first so a fault leaves memory unchanged.
            let second = (va | 0xfff) &+ 1
            guard translate(va, .store) != nil, translate(second, .store) != nil else { return false }
            for i in 0..<size {
                guard storeSlow(va &+ UInt64(i), (value >> (8 * UInt64(i))) & 0xff, 1) else { return false }
            }
            return true
        }
        let hit = tlb + (TLBEntry.storeBank + (st.pointee.tlbMode << 8 | Int((va >> 12) & 255)))
        if hit.pointee.tag == va & ~0xfff {  // misaligned inside a mapped page
            let host = UnsafeMutableRawPointer(bitPattern: UInt(va &+ hit.pointee.addend)).unsafelyUnwrapped
            switch size {
            // SAFETY: the caller checked the access does not cross the page, and the page's `addend`
            // came from a checked `ram.pointer`; `storeBytes` needs no alignment.
            case 1: host.storeBytes(of: UInt8(truncatingIfNeeded: value), as: UInt8.self)
            case 2: host.storeBytes(of: UInt16(truncatingIfNeeded: value), as: UInt16.self)
            case 4: host.storeBytes(of: UInt32(truncatingIfNeeded: value), as: UInt32.self)
            default: host.storeBytes(of: value, as: UInt64.self)
            }
            return true
        }
        guard let pa = translate(va, .store) else { return false }
        if let host = ram.pointer(at: pa, count: UInt64(size)) {
            let page = Int((pa - ram.base) >> 12)
            if code.hasCode[page] {
                code.invalidate(page)
                if page == st.pointee.fetchPage { st.pointee.fetchVBase = .max }
            }
            let e = tlb + (TLBEntry.storeBank + (st.pointee.tlbMode << 8 | Int((va >> 12) & 255)))
            e.pointee.tag = va & ~0xfff
            e.pointee.addend = UInt64(UInt(bitPattern: host)) &- va
            e.pointee.page = page
            switch size {
            // SAFETY: `host` came from `ram.pointer(at: pa, count: size)`, which checked the bounds;
            // `storeBytes` needs no alignment.
            case 1: host.storeBytes(of: UInt8(truncatingIfNeeded: value), as: UInt8.self)
            case 2: host.storeBytes(of: UInt16(truncatingIfNeeded: value), as: UInt16.self)
            case 4: host.storeBytes(of: UInt32(truncatingIfNeeded: value), as: UInt32.self)
            default: host.storeBytes(of: value, as: UInt64.self)
            }
            if st.pointee.reservation == pa & ~7 { st.pointee.reservation = .max }
            return true
        }
        if let (device, offset) = bus.find(pa, size: size) {
            device.write(offset: offset, size: size, value: value)
            return true
        }
        raise(Cause.storeAccess, tval: va)
        return false
    }

    // MARK: Fetch

    /// Points the fetch state at the page holding `st.pc`; false if that raised a trap.
    @inline(never)
    func refillFetch() -> Bool {
        let va = st.pointee.pc
        let vpn = va >> 12
        let e = tlb + (TLBEntry.fetchBank + (Int(st.pointee.priv) << 8 | Int(vpn & 255)))
        var page: Int
        if e.pointee.tag == vpn {
            page = e.pointee.page
        } else {
            guard let pa = translate(va, .fetch) else { return false }
            guard ram.contains(pa, count: 2) else {
                raise(Cause.fetchAccess, tval: va)
                return false
            }
            page = Int((pa - ram.base) >> 12)
            e.pointee.tag = vpn
            e.pointee.page = page
        }
        st.pointee.fetchPage = page
        watchFetchPage()
        st.pointee.fetchCode = code.page(page)
        st.pointee.fetchVBase = va & ~0xfff
        return true
    }

    /// Decodes the instruction at `st.pc` (the fetch page is current). Instructions that
    /// straddle a page boundary are decoded from both pages and not cached (`cacheable` false).
    func decodeAtPC(cacheable: inout Bool) -> DecodedInstruction? {
        let va = st.pointee.pc
        let host = ram.host + ((st.pointee.fetchPage << 12) | Int(va & 0xfff))
        let low = UInt32(host.load(as: UInt16.self))
        if low & 3 != 3 {
            cacheable = true
            return RISCVDecoder.decodeCompressed(low)
        }
        if va & 0xfff != 0xffe {
            cacheable = true
            return RISCVDecoder.decode(UInt32(host.loadUnaligned(as: UInt16.self)) | UInt32(host.advanced(by: 2).loadUnaligned(as: UInt16.self)) << 16)
        }
        cacheable = false
        let next = va &+ 2
        guard let pa = translate(next, .fetch) else { return nil }
        guard let h2 = ram.pointer(at: pa, count: 2) else {
            raise(Cause.fetchAccess, tval: next)
            return nil
        }
        return RISCVDecoder.decode(low | UInt32(h2.load(as: UInt16.self)) << 16)
    }

    /// Best-effort read of the instruction word at a virtual address, without side effects (crash reports).
    func peekInstruction(at va: UInt64) -> UInt32? {
        var pa = va
        if st.pointee.satp >> 60 != 0 {
            // Walk without raising: save and restore the trap-visible state.
            let saved = st.pointee
            let savedExit = exitReason
            peeking = true
            defer { peeking = false; st.pointee = saved; exitReason = savedExit }
            guard let p = translate(va, .fetch) else { return nil }
            pa = p
        }
        guard let h = ram.pointer(at: pa, count: 2) else { return nil }
        let low = UInt32(h.load(as: UInt16.self))
        if low & 3 != 3 { return low }
        guard let h4 = ram.pointer(at: pa, count: 4) else { return low }
        return h4.loadUnaligned(as: UInt32.self)
    }
}
