import QBlock

/// The RISC-V Platform-Level Interrupt Controller with QEMU's `sifive_plic` register
/// layout (the RISC-V PLIC specification v1.0.0, chapter 3 "Memory Map"):
///
/// ```
/// 0x000000 + 4*i            priority of source i (1..sources-1; source 0 does not exist)
/// 0x001000 + 4*(i/32)       pending bits (read-only)
/// 0x002000 + 0x80*c + 4*w   enable bits of context c
/// 0x200000 + 0x1000*c       priority threshold of context c
/// 0x200004 + 0x1000*c       claim (read) / complete (write) of context c
/// ```
/// Sources are level-triggered: a source's gateway holds it pending while its line is
/// high and it is not claimed; completing a source whose line is still high makes it
/// pending again. A context's output line is high while some pending source enabled for
/// it has a priority above the context's threshold.
// @unchecked: every register array is only touched with `lock` held; `sources` and `contexts` are
// immutable.
public final class PLIC: BusDevice, @unchecked Sendable {
    /// Offset of the source priority registers (4 bytes per source).
    public static let priorityBase: UInt64 = 0x0
    /// Offset of the pending bits (one bit per source).
    public static let pendingBase: UInt64 = 0x1000
    /// Offset of context 0's enable bits.
    public static let enableBase: UInt64 = 0x2000
    /// Bytes between two contexts' enable bits.
    public static let enableStride: UInt64 = 0x80
    /// Offset of context 0's threshold and claim/complete registers.
    public static let contextBase: UInt64 = 0x20_0000
    /// Bytes between two contexts' threshold registers.
    public static let contextStride: UInt64 = 0x1000
    /// Priorities are 0...7 (three bits, as on QEMU's virt).
    public static let maxPriority: UInt32 = 7

    /// Number of interrupt sources including the non-existent source 0 (QEMU's virt: 96).
    public let sources: Int
    /// The number of contexts (hart privilege levels with an interrupt output).
    public let contexts: Int
    /// The size of the register window for this many contexts.
    public var windowSize: UInt64 { Self.contextBase + UInt64(contexts) * Self.contextStride }

    private let lock = DeviceLock()
    private var priority: [UInt32]
    private var level: [Bool]
    private var pending: [Bool]
    private var claimed: [Bool]
    private var enable: [[UInt32]]     // [context][word]
    private var threshold: [UInt32]
    private var outputs: [(any InterruptLine)?]
    private var outputLevel: [Bool]

    /// Creates a PLIC with `sources` interrupt sources (source 0 is reserved; 2...1024) and
    /// `contexts` contexts, all priorities, enables and thresholds 0 (QEMU's `virt` uses 96
    /// sources).
    public init(sources: Int = 96, contexts: Int = 2) {
        precondition(sources >= 2 && sources <= 1024 && contexts >= 1)
        self.sources = sources
        self.contexts = contexts
        priority = Array(repeating: 0, count: sources)
        level = Array(repeating: false, count: sources)
        pending = Array(repeating: false, count: sources)
        claimed = Array(repeating: false, count: sources)
        enable = Array(repeating: Array(repeating: 0, count: (sources + 31) / 32), count: contexts)
        threshold = Array(repeating: 0, count: contexts)
        outputs = Array(repeating: nil, count: contexts)
        outputLevel = Array(repeating: false, count: contexts)
    }

    /// Connects context `context`'s output to a CPU's external interrupt input.
    public func connect(context: Int, to line: any InterruptLine) {
        lock.withLock {
            outputs[context] = line
            outputLevel[context] = false
            updateOutputs()
        }
    }

    /// The input line of source `irq` (1..<sources), to give to a device.
    public func source(_ irq: Int) -> any InterruptLine {
        precondition(irq > 0 && irq < sources, "PLIC source \(irq) out of range")
        return Source(plic: self, irq: irq)
    }

    // @unchecked: no mutable state: `plic` and `irq` are immutable; setting the level takes the PLIC's
    // lock.
    private final class Source: InterruptLine, @unchecked Sendable {
        unowned let plic: PLIC
        let irq: Int
        init(plic: PLIC, irq: Int) { self.plic = plic; self.irq = irq }
        func set(_ level: Bool) { plic.setSource(irq, level) }
    }

    func setSource(_ irq: Int, _ high: Bool) {
        lock.withLock {
            level[irq] = high
            if high && !claimed[irq] { pending[irq] = true }
            // A level-triggered source that drops before being claimed is no longer pending.
            if !high && !claimed[irq] { pending[irq] = false }
            updateOutputs()
        }
    }

    /// A guest read of a 32-bit register at `offset`: priorities, pending bits, enables,
    /// thresholds, or a claim (which returns the best pending source and clears its pending
    /// bit). Other sizes read 0.
    public func read(offset: UInt64, size: Int) -> UInt64 {
        guard size == 4 else { return 0 }
        return lock.withLock { () -> UInt64 in
            switch offset {
            case Self.priorityBase..<Self.pendingBase:
                let i = Int(offset / 4)
                return i < sources ? UInt64(priority[i]) : 0
            case Self.pendingBase..<Self.enableBase:
                let w = Int((offset - Self.pendingBase) / 4)
                var bits: UInt32 = 0
                for b in 0..<32 { let i = w * 32 + b; if i < sources && pending[i] { bits |= 1 << b } }
                return UInt64(bits)
            case Self.enableBase..<Self.contextBase:
                let c = Int((offset - Self.enableBase) / Self.enableStride)
                let w = Int((offset - Self.enableBase) % Self.enableStride / 4)
                guard c < contexts, w < enable[c].count else { return 0 }
                return UInt64(enable[c][w])
            default:
                let c = Int((offset - Self.contextBase) / Self.contextStride)
                guard c < contexts else { return 0 }
                switch (offset - Self.contextBase) % Self.contextStride {
                case 0: return UInt64(threshold[c])
                case 4:
                    let irq = best(for: c)
                    if irq != 0 {
                        pending[irq] = false
                        claimed[irq] = true
                        updateOutputs()
                    }
                    return UInt64(irq)
                default: return 0
                }
            }
        }
    }

    /// A guest write of a 32-bit register at `offset`: priorities, enables, thresholds, or a
    /// completion (which lets the source interrupt again). Other sizes are ignored.
    public func write(offset: UInt64, size: Int, value: UInt64) {
        guard size == 4 else { return }
        let v = UInt32(truncatingIfNeeded: value)
        lock.withLock {
            switch offset {
            case Self.priorityBase..<Self.pendingBase:
                let i = Int(offset / 4)
                if i > 0 && i < sources { priority[i] = min(v, Self.maxPriority) }
            case Self.pendingBase..<Self.enableBase:
                break // read-only
            case Self.enableBase..<Self.contextBase:
                let c = Int((offset - Self.enableBase) / Self.enableStride)
                let w = Int((offset - Self.enableBase) % Self.enableStride / 4)
                guard c < contexts, w < enable[c].count else { return }
                var bits = v
                if w == 0 { bits &= ~1 } // source 0 does not exist
                if (w + 1) * 32 > sources { bits &= UInt32(truncatingIfNeeded: (UInt64(1) << (sources - w * 32)) - 1) }
                enable[c][w] = bits
            default:
                let c = Int((offset - Self.contextBase) / Self.contextStride)
                guard c < contexts else { return }
                switch (offset - Self.contextBase) % Self.contextStride {
                case 0: threshold[c] = min(v, Self.maxPriority)
                case 4:
                    // Completion: ignored unless the source is enabled for this context
                    // (the specification's rule) and was claimed.
                    let irq = Int(v)
                    guard irq > 0, irq < sources, isEnabled(irq, c), claimed[irq] else { return }
                    claimed[irq] = false
                    if level[irq] { pending[irq] = true }
                default: break
                }
            }
            updateOutputs()
        }
    }

    // MARK: - Under the lock

    private func isEnabled(_ irq: Int, _ c: Int) -> Bool { enable[c][irq / 32] & (1 << (irq % 32)) != 0 }

    /// The pending source enabled for `c` with the highest priority above the threshold
    /// (the lowest id among equals), or 0.
    private func best(for c: Int) -> Int {
        var bestIRQ = 0, bestPriority: UInt32 = 0
        for w in 0..<enable[c].count where enable[c][w] != 0 {
            var bits = enable[c][w]
            while bits != 0 {
                let b = bits.trailingZeroBitCount
                bits &= bits - 1
                let i = w * 32 + b
                if pending[i] && priority[i] > threshold[c] && priority[i] > bestPriority {
                    bestIRQ = i; bestPriority = priority[i]
                }
            }
        }
        return bestIRQ
    }

    private func updateOutputs() {
        for c in 0..<contexts {
            let l = best(for: c) != 0
            if l != outputLevel[c] {
                outputLevel[c] = l
                outputs[c]?.set(l)
            }
        }
    }
}
