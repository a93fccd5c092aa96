import QBlock

/// An ns16550a UART with byte-wide registers (reg-shift 0), as on QEMU's virt board.
///
/// Registers (offset, DLAB = LCR bit 7):
/// ```
/// 0  RBR (read) / THR (write)          DLL when DLAB
/// 1  IER: ERBFI 0x01, ETBEI 0x02, ELSI 0x04, EDSSI 0x08     DLM when DLAB
/// 2  IIR (read): 0x01 none, 0x06 line status, 0x04 data, 0x0c timeout, 0x02 THR empty,
///    0x00 modem status; bits 7:6 set when FIFOs are on.   FCR (write)
/// 3  LCR   4 MCR (loop 0x10)   5 LSR: DR 0x01, OE 0x02, THRE 0x20, TEMT 0x40
/// 6  MSR   7 SCR
/// ```
/// Transmission is instantaneous: a byte written to THR goes to the backend at once and
/// the THR-empty interrupt is raised again. Received bytes queue in a FIFO (16 bytes, as
/// the chip's, plus an overflow reserve so typed input is not lost while the guest sleeps).
// @unchecked: the FIFO and every register var are only touched with `lock` held; `backend` and `irq`
// are immutable.
public final class UART16550: BusDevice, @unchecked Sendable {
    /// The size in bytes of the register window (8 registers, mapped in a 256-byte slot).
    public static let windowSize: UInt64 = 0x100

    private enum IER { static let rda: UInt8 = 0x01, thre: UInt8 = 0x02, rls: UInt8 = 0x04, msi: UInt8 = 0x08 }
    private enum LSR { static let dr: UInt8 = 0x01, oe: UInt8 = 0x02, thre: UInt8 = 0x20, temt: UInt8 = 0x40 }
    private enum IIR { static let none: UInt8 = 0x01, rls: UInt8 = 0x06, rda: UInt8 = 0x04, timeout: UInt8 = 0x0c, thre: UInt8 = 0x02, msi: UInt8 = 0x00 }

    private let lock = DeviceLock()
    private let backend: any SerialBackend
    private let irq: any InterruptLine
    private var rx: [UInt8] = []
    private var rxHead = 0
    private let rxCapacity = 4096
    private var ier: UInt8 = 0
    private var lcr: UInt8 = 0
    private var mcr: UInt8 = 0
    private var lsrErrors: UInt8 = 0
    private var scr: UInt8 = 0
    private var fcr: UInt8 = 0
    private var dll: UInt8 = 0x0c
    private var dlm: UInt8 = 0
    private var msrDelta: UInt8 = 0
    /// THR-empty interrupt pending (cleared by reading IIR while it is the reported source).
    private var thrPending = false
    private var lineLevel = false

    /// Creates a UART whose output goes to `backend` and whose interrupt drives `irq`.
    public init(backend: any SerialBackend, irq: any InterruptLine) {
        self.backend = backend
        self.irq = irq
    }

    /// Starts taking input from the backend.
    public func connectInput() {
        backend.startInput { [weak self] bytes in self?.receive(bytes) }
    }

    /// Bytes arriving on the line (from the backend's input thread, or loopback).
    public func receive(_ bytes: [UInt8]) {
        lock.withLock {
            for b in bytes {
                if rx.count - rxHead >= rxCapacity { lsrErrors |= LSR.oe; break }
                rx.append(b)
            }
            update()
        }
    }

    /// Takes one queued input byte (the SBI console's getchar shares the port's input).
    public func takeInputByte() -> UInt8? {
        lock.withLock {
            let b = popRX()
            update()
            return b
        }
    }

    /// Writes bytes to the backend as if transmitted (the SBI console's putchar).
    public func transmit(_ bytes: UnsafeRawBufferPointer) { backend.write(bytes) }

    /// A guest read of the register at `offset` (RBR/DLL, IER/DLM, IIR, LCR, MCR, LSR, MSR,
    /// SCR); reading RBR takes a byte from the receive FIFO.
    public func read(offset: UInt64, size: Int) -> UInt64 {
        let v: UInt8 = lock.withLock {
            let dlab = lcr & 0x80 != 0
            var r: UInt8 = 0
            switch offset {
            case 0:
                if dlab { r = dll } else { r = popRX() ?? 0 }
            case 1: r = dlab ? dlm : ier
            case 2:
                r = iirValue()
                if r & 0x0f == IIR.thre { thrPending = false }
                r |= fcr & 0x01 != 0 ? 0xc0 : 0
            case 3: r = lcr
            case 4: r = mcr
            case 5:
                r = lsrValue()
                lsrErrors = 0
            case 6:
                if mcr & 0x10 != 0 {
                    // Loopback: DTR→DSR, RTS→CTS, OUT1→RI, OUT2→DCD.
                    r = (mcr & 0x01) << 5 | (mcr & 0x02) << 3 | (mcr & 0x04) << 4 | (mcr & 0x08) << 4
                } else {
                    r = 0xb0 // DCD, DSR, CTS asserted
                }
                r |= msrDelta
                msrDelta = 0
            case 7: r = scr
            default: r = 0
            }
            update()
            return r
        }
        return UInt64(v)
    }

    /// A guest write of the register at `offset`; a THR write sends the byte to the backend
    /// (or loops it back in loopback mode) and raises the THR-empty interrupt.
    public func write(offset: UInt64, size: Int, value: UInt64) {
        let b = UInt8(truncatingIfNeeded: value)
        var out: UInt8?
        var loop: UInt8?
        lock.withLock {
            let dlab = lcr & 0x80 != 0
            switch offset {
            case 0:
                if dlab { dll = b } else {
                    if mcr & 0x10 != 0 { loop = b } else { out = b }
                    // Sent at once: the holding register is empty again.
                    thrPending = true
                }
            case 1:
                if dlab { dlm = b } else {
                    let was = ier
                    ier = b & 0x0f
                    // Enabling ETBEI with THR empty raises the THR-empty interrupt.
                    if ier & IER.thre != 0 && was & IER.thre == 0 { thrPending = true }
                }
            case 2:
                fcr = b & 0xc9
                if b & 0x02 != 0 { rx.removeAll(); rxHead = 0 }
            case 3: lcr = b
            case 4: mcr = b & 0x1f
            case 7: scr = b
            default: break
            }
            update()
        }
        // SAFETY: a pointer to a local byte, used only during the call.
        if let out { withUnsafeBytes(of: out) { backend.write($0) } }
        if let loop { receive([loop]) }
    }

    // MARK: - Under the lock

    private func popRX() -> UInt8? {
        guard rxHead < rx.count else { return nil }
        let b = rx[rxHead]
        rxHead += 1
        if rxHead == rx.count { rx.removeAll(keepingCapacity: true); rxHead = 0 }
        else if rxHead > 1024 { rx.removeFirst(rxHead); rxHead = 0 }
        return b
    }

    private func lsrValue() -> UInt8 {
        var r = LSR.thre | LSR.temt | lsrErrors
        if rxHead < rx.count { r |= LSR.dr }
        return r
    }

    private func iirValue() -> UInt8 {
        if ier & IER.rls != 0 && lsrErrors != 0 { return IIR.rls }
        if ier & IER.rda != 0 && rxHead < rx.count { return fcr & 0x01 != 0 ? IIR.timeout : IIR.rda }
        if ier & IER.thre != 0 && thrPending { return IIR.thre }
        if ier & IER.msi != 0 && msrDelta != 0 { return IIR.msi }
        return IIR.none
    }

    /// Drives the interrupt output (asserted while any enabled condition holds). Called
    /// under the lock, so that levels computed by two threads reach the line in order.
    @discardableResult
    private func update() -> Bool {
        let l = iirValue() != IIR.none
        if l != lineLevel {
            lineLevel = l
            irq.set(l)
        }
        return l
    }
}
