import Testing
@testable import QMachine

private final class Scratch: BusDevice, @unchecked Sendable {
    var last: (UInt64, Int, UInt64)?
    func read(offset: UInt64, size: Int) -> UInt64 { offset &+ UInt64(size) }
    func write(offset: UInt64, size: Int, value: UInt64) { last = (offset, size, value) }
}

@Suite struct BusTests {
    @Test func dispatchesByRangeAndRefusesOverlap() throws {
        let bus = Bus()
        let a = Scratch(), b = Scratch()
        try bus.map(base: 0x1000_0000, size: 0x100, device: a)
        try bus.map(base: 0x1000_1000, size: 0x1000, device: b)
        #expect(bus.read(0x1000_0010, size: 4) == 0x14)
        #expect(bus.read(0x1000_1ffc, size: 4) == 0xffc + 4)
        #expect(bus.read(0x1000_1ffe, size: 4) == nil, "access crossing the end of a window")
        #expect(bus.read(0x1000_0100, size: 1) == nil)
        #expect(bus.write(0x1000_1008, size: 8, value: 7))
        #expect(b.last?.0 == 8 && b.last?.2 == 7)
        #expect(throws: MachineError.self) { try bus.map(base: 0x1000_00f0, size: 0x20, device: b) }
    }

    @Test func ramChecksRanges() throws {
        let ram = try GuestRAM(base: 0x8000_0000, size: 1 << 20)
        #expect(ram.contains(0x8000_0000, count: 1 << 20))
        #expect(!ram.contains(0x8000_0000, count: (1 << 20) + 1))
        #expect(!ram.contains(0x7fff_ffff, count: 2))
        #expect(ram.pointer(at: 0x8010_0000, count: 1) == nil)
        try ([1, 2, 3] as [UInt8]).withUnsafeBytes { try ram.write($0, at: 0x8000_1000) }
        var out = [UInt8](repeating: 0, count: 3)
        try out.withUnsafeMutableBytes { try ram.read(into: $0, at: 0x8000_1000) }
        #expect(out == [1, 2, 3])
    }
}
