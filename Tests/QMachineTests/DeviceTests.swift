import Foundation
import QBlock
import Testing
import TestSupport
@testable import QMachine

/// An interrupt wire that remembers its level and how often it rose.
final class TestLine: InterruptLine, @unchecked Sendable {
    private let lock = DeviceLock()
    private var _level = false
    private var _rises = 0
    func set(_ level: Bool) {
        lock.withLock {
            if level && !_level { _rises += 1 }
            _level = level
            lock.broadcast()
        }
    }
    var level: Bool { lock.withLock { _level } }
    var rises: Int { lock.withLock { _rises } }
    /// Waits (bounded) until the line is high.
    func waitHigh(seconds: Double = 5) -> Bool {
        lock.withLock {
            let start = ContinuousClock.now
            while !_level {
                if ContinuousClock.now - start > .seconds(seconds) { return false }
                _ = lock.wait(seconds: 0.05)
            }
            return true
        }
    }
}

@Suite struct UARTDeviceTests {
    let out = BufferSerialBackend()
    let line = TestLine()
    var uart: UART16550 { _uart }
    private let _uart: UART16550

    init() {
        _uart = UART16550(backend: out, irq: line)
        _uart.connectInput()
    }

    @Test func transmitsAndReportsLineStatus() {
        for c in "hi\n".utf8 { uart.write(offset: 0, size: 1, value: UInt64(c)) }
        #expect(out.text == "hi\n")
        let lsr = uart.read(offset: 5, size: 1)
        #expect(lsr & 0x60 == 0x60, "THR empty and transmitter empty")
        #expect(lsr & 0x01 == 0, "no data ready")
        #expect(uart.read(offset: 2, size: 1) & 0x0f == 0x01, "no interrupt pending")
        #expect(!line.level)
    }

    @Test func divisorLatchAndScratch() {
        uart.write(offset: 3, size: 1, value: 0x83)       // DLAB, 8N1
        uart.write(offset: 0, size: 1, value: 0x01)
        uart.write(offset: 1, size: 1, value: 0x02)
        #expect(uart.read(offset: 0, size: 1) == 0x01)
        #expect(uart.read(offset: 1, size: 1) == 0x02)
        uart.write(offset: 3, size: 1, value: 0x03)
        #expect(uart.read(offset: 1, size: 1) == 0, "IER untouched by the divisor writes")
        #expect(out.output.isEmpty, "divisor writes are not data")
        uart.write(offset: 7, size: 1, value: 0x5a)
        #expect(uart.read(offset: 7, size: 1) == 0x5a)
        #expect(uart.read(offset: 3, size: 1) == 0x03)
    }

    @Test func thrEmptyInterruptRaisedOnEnableAndClearedByIIRRead() {
        uart.write(offset: 1, size: 1, value: 0x02)       // ETBEI
        #expect(line.level)
        #expect(uart.read(offset: 2, size: 1) & 0x0f == 0x02)
        #expect(!line.level, "reading IIR clears the THR-empty interrupt")
        #expect(uart.read(offset: 2, size: 1) & 0x0f == 0x01)
        uart.write(offset: 0, size: 1, value: 0x41)       // a write re-arms it
        #expect(line.level)
        uart.write(offset: 1, size: 1, value: 0x00)
        #expect(!line.level, "disabled")
    }

    @Test func receiveInterruptAndFIFO() {
        uart.write(offset: 2, size: 1, value: 0x01)       // FIFO on
        uart.write(offset: 1, size: 1, value: 0x01)       // ERBFI
        #expect(!line.level)
        out.type(Array("ab".utf8))
        #expect(line.level)
        #expect(uart.read(offset: 5, size: 1) & 0x01 == 1)
        let iir = uart.read(offset: 2, size: 1)
        #expect(iir & 0xc0 == 0xc0, "FIFOs enabled")
        #expect(iir & 0x0f == 0x0c || iir & 0x0f == 0x04)
        #expect(uart.read(offset: 0, size: 1) == UInt64(UInt8(ascii: "a")))
        #expect(line.level)
        #expect(uart.read(offset: 0, size: 1) == UInt64(UInt8(ascii: "b")))
        #expect(!line.level, "FIFO drained")
        #expect(uart.read(offset: 5, size: 1) & 0x01 == 0)
    }

    @Test func fifoResetDropsInputAndLoopbackEchoes() {
        out.type([1, 2, 3])
        uart.write(offset: 2, size: 1, value: 0x03)       // enable + clear RX
        #expect(uart.read(offset: 5, size: 1) & 0x01 == 0)
        uart.write(offset: 4, size: 1, value: 0x10)       // loopback
        uart.write(offset: 0, size: 1, value: 0x77)
        #expect(out.output.isEmpty, "loopback does not transmit")
        #expect(uart.read(offset: 0, size: 1) == 0x77)
        #expect(uart.read(offset: 6, size: 1) & 0xf0 == 0, "loopback modem status follows MCR (all off)")
    }

    @Test func sbiConsoleSharesInput() {
        out.type([0x42])
        #expect(uart.takeInputByte() == 0x42)
        #expect(uart.takeInputByte() == nil)
    }
}

@Suite struct PLICDeviceTests {
    let plic = PLIC(sources: 96, contexts: 2)
    let m = TestLine(), s = TestLine()

    init() {
        plic.connect(context: 0, to: m)
        plic.connect(context: 1, to: s)
    }

    func enable(_ irq: Int, context: Int) {
        let off = PLIC.enableBase + UInt64(context) * PLIC.enableStride + UInt64(irq / 32) * 4
        let cur = plic.read(offset: off, size: 4)
        plic.write(offset: off, size: 4, value: cur | 1 << UInt64(irq % 32))
    }
    func priority(_ irq: Int, _ p: UInt64) { plic.write(offset: UInt64(irq) * 4, size: 4, value: p) }
    func claim(_ c: Int) -> UInt64 { plic.read(offset: PLIC.contextBase + UInt64(c) * PLIC.contextStride + 4, size: 4) }
    func complete(_ c: Int, _ irq: UInt64) { plic.write(offset: PLIC.contextBase + UInt64(c) * PLIC.contextStride + 4, size: 4, value: irq) }
    func threshold(_ c: Int, _ t: UInt64) { plic.write(offset: PLIC.contextBase + UInt64(c) * PLIC.contextStride, size: 4, value: t) }

    @Test func claimCompleteCycleOfALevelSource() {
        let src = plic.source(10)
        priority(10, 1)
        enable(10, context: 1)
        src.set(true)
        #expect(s.level && !m.level, "only the context that enabled the source")
        #expect(plic.read(offset: PLIC.pendingBase, size: 4) & (1 << 10) != 0)
        #expect(claim(1) == 10)
        #expect(!s.level, "claimed: no longer pending")
        #expect(claim(1) == 0, "nothing else to claim")
        complete(1, 10)
        #expect(s.level, "line still high: pending again after completion")
        #expect(claim(1) == 10)
        src.set(false)
        complete(1, 10)
        #expect(!s.level)
        #expect(plic.read(offset: PLIC.pendingBase, size: 4) == 0)
    }

    @Test func priorityOrderAndThreshold() {
        let a = plic.source(3), b = plic.source(7)
        priority(3, 2); priority(7, 5)
        enable(3, context: 1); enable(7, context: 1)
        a.set(true); b.set(true)
        threshold(1, 5)
        #expect(!s.level, "both at or below the threshold")
        #expect(claim(1) == 0)
        threshold(1, 1)
        #expect(s.level)
        #expect(claim(1) == 7, "highest priority first")
        #expect(claim(1) == 3)
        complete(1, 7); complete(1, 3)
        priority(7, 2)
        #expect(claim(1) == 3, "equal priorities: lowest id first")
        priority(3, 0)
        complete(1, 3)
        #expect(claim(1) == 7, "priority 0 never interrupts")
    }

    @Test func registersReadBackAndSourceZeroIsNotThere() {
        priority(5, 9)
        #expect(plic.read(offset: 5 * 4, size: 4) == 7, "priority clamps to 7")
        priority(0, 3)
        #expect(plic.read(offset: 0, size: 4) == 0)
        enable(0, context: 0)
        #expect(plic.read(offset: PLIC.enableBase, size: 4) & 1 == 0)
        threshold(0, 4)
        #expect(plic.read(offset: PLIC.contextBase, size: 4) == 4)
        #expect(plic.windowSize == 0x20_2000)
        #expect(plic.read(offset: PLIC.enableBase + 3 * 4, size: 4) == 0, "word 3 holds no sources (96)")
    }

    @Test func completionOfAnUnclaimedOrDisabledSourceIsIgnored() {
        let src = plic.source(4)
        priority(4, 1); enable(4, context: 0)
        src.set(true)
        complete(0, 4)            // not claimed: ignored
        #expect(claim(0) == 4)
        complete(1, 4)            // not enabled for context 1: ignored
        #expect(claim(0) == 0, "still claimed")
        complete(0, 4)
        #expect(claim(0) == 4)
    }
}

@Suite struct DeviceRegisterFuzzTests {
    /// Random accesses (offset, size, value) from a hostile guest to every register window:
    /// no crash, and reads stay within the access size.
    @Test func randomAccessesNeverCrash() async throws {
        var rng = SplitMix(seed: 42)
        let out = BufferSerialBackend()
        let plic = PLIC(sources: 96, contexts: 2)
        plic.connect(context: 1, to: TestLine())
        let uart = UART16550(backend: out, irq: plic.source(10))
        let ram = try GuestRAM(base: 0x8000_0000, size: 1 << 20)
        let mmio = VirtioMMIO(device: nil, ram: ram, irq: plic.source(1))
        let dir = TempDir("regfuzz")
        try await ImageCreator.create(format: "raw", path: dir.file("d.raw"), size: 1 << 20)
        let node = try await ImageOpener.open(dir.file("d.raw"), options: OpenOptions(format: "raw"))
        let blk = VirtioMMIO(device: VirtioBlock(node: node), ram: ram, irq: plic.source(2))
        let devices: [(any BusDevice, UInt64)] = [(plic, plic.windowSize), (uart, UART16550.windowSize),
                                                  (mmio, VirtioMMIO.windowSize), (blk, VirtioMMIO.windowSize)]
        for _ in 0..<200_000 {
            let (dev, size) = devices[Int(rng.next() % 4)]
            let width = [1, 2, 4, 8][Int(rng.next() % 4)]
            let offset = rng.next() % 8 == 0 ? rng.next() % size : (rng.next() % 0x120) & ~3
            if rng.next() % 2 == 0 {
                dev.write(offset: offset, size: width, value: rng.next())
            } else {
                let v = dev.read(offset: offset, size: width)
                if width < 8 { #expect(v >> (8 * UInt64(width)) == 0) }
            }
        }
        // Drain whatever the random notifies started, off the cooperative pool.
        await withCheckedContinuation { (k: CheckedContinuation<Void, Never>) in
            Thread { blk.write(offset: 0x70, size: 4, value: 0); k.resume() }.start()
        }
        try await node.close()
    }
}
