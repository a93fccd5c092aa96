import Foundation
import Testing
import TestSupport
@testable import QMachine

@Suite struct FDTTests {
    static func virtTree(initrd: (start: UInt64, end: UInt64)? = (0x8820_0000, 0x8830_0000)) -> VirtDeviceTree {
        VirtDeviceTree(ramBase: 0x8000_0000, ramSize: 512 << 20,
                       cpu: .init(isa: "rv64imafdc_zicsr_zifencei", isaBase: "rv64i",
                                  isaExtensions: ["i", "m", "a", "f", "d", "c", "zicsr", "zifencei"],
                                  mmuType: "riscv,sv39", timebaseFrequency: 10_000_000),
                       plicBase: 0x0c00_0000, plicSize: 0x20_2000, plicSources: 95,
                       uartBase: 0x1000_0000, uartIRQ: 10, uartClock: 3_686_400,
                       virtioSlots: (0..<8).map { (0x1000_1000 + UInt64($0) * 0x1000, 0x1000, UInt32(1 + $0)) },
                       bootargs: "console=ttyS0 cryptomgr.notests", initrd: initrd)
    }

    @Test func builderEncodesHeaderBlocksAndAlignment() throws {
        var f = FDTBuilder()
        f.reserve(address: 0x8000_0000, size: 0x1000)
        f.beginNode("")
        f.property("a", u32: 0x1234_5678)
        f.property("name-longer", string: "xyz")       // 4 bytes with NUL
        f.property("odd", bytes: [1, 2, 3])              // padded to 4
        f.beginNode("child@1")
        f.property("a", u64: 0x1_0000_0002)            // "a" shares its string
        f.property("empty")
        f.endNode()
        f.endNode()
        let b = f.finish()
        func be32(_ o: Int) -> UInt32 { UInt32(b[o]) << 24 | UInt32(b[o + 1]) << 16 | UInt32(b[o + 2]) << 8 | UInt32(b[o + 3]) }
        #expect(be32(0) == 0xd00d_feed)
        #expect(Int(be32(4)) == b.count)
        #expect(be32(20) == 17 && be32(24) == 16)
        #expect(be32(16) == 40, "reservation map right after the header")
        #expect(be32(8) == 40 + 32, "one entry + terminator")
        #expect(be32(8) % 4 == 0 && be32(16) % 8 == 0)
        let strings = Array(b[Int(be32(12))..<Int(be32(12) + be32(32))])
        #expect(strings == Array("a\0name-longer\0odd\0empty\0".utf8))
        #expect(be32(Int(be32(8)) + Int(be32(36)) - 4) == 9, "structure ends with FDT_END")

        let blob = try FDTReader.decode(b)
        #expect(blob.reservations.count == 1 && blob.reservations[0].address == 0x8000_0000)
        #expect(blob.root.cells("a") == [0x1234_5678])
        #expect(blob.root.strings("name-longer") == ["xyz"])
        #expect(blob.root.property("odd") == [1, 2, 3])
        #expect(blob.root.node(at: "child@1")?.cells("a") == [1, 2])
        #expect(blob.root.node(at: "child@1")?.property("empty") == [])
    }

    @Test func virtTreeHasWhatLinuxLooksFor() throws {
        let blob = try FDTReader.decode(Self.virtTree().build())
        let r = blob.root
        #expect(r.cells("#address-cells") == [2] && r.cells("#size-cells") == [2])
        #expect(r.node(at: "memory@80000000")?.cells("reg") == [0, 0x8000_0000, 0, 0x2000_0000])
        #expect(r.node(at: "memory@80000000")?.strings("device_type") == ["memory"])
        let cpus = try #require(r.node(at: "cpus"))
        #expect(cpus.cells("timebase-frequency") == [10_000_000])
        let cpu = try #require(cpus.node(at: "cpu@0"))
        #expect(cpu.strings("riscv,isa") == ["rv64imafdc_zicsr_zifencei"])
        #expect(cpu.strings("mmu-type") == ["riscv,sv39"])
        #expect(cpu.strings("riscv,isa-base") == ["rv64i"])
        #expect(cpu.strings("riscv,isa-extensions") == ["i", "m", "a", "f", "d", "c", "zicsr", "zifencei"])
        #expect(cpu.strings("status") == ["okay"] && cpu.strings("device_type") == ["cpu"])
        let intc = try #require(cpu.node(at: "interrupt-controller"))
        #expect(intc.strings("compatible") == ["riscv,cpu-intc"])
        #expect(intc.cells("#interrupt-cells") == [1] && intc.property("interrupt-controller") == [])
        let intcPhandle = try #require(intc.cells("phandle")?.first)

        let plic = try #require(r.node(at: "soc/plic@c000000"))
        #expect(plic.strings("compatible") == ["sifive,plic-1.0.0", "riscv,plic0"])
        #expect(plic.cells("interrupts-extended") == [intcPhandle, 11, intcPhandle, 9])
        #expect(plic.cells("riscv,ndev") == [95])
        let plicPhandle = try #require(plic.cells("phandle")?.first)

        let uart = try #require(r.node(at: "soc/serial@10000000"))
        #expect(uart.strings("compatible") == ["ns16550a"])
        #expect(uart.cells("interrupts") == [10] && uart.cells("interrupt-parent") == [plicPhandle])
        #expect(uart.cells("clock-frequency") == [3_686_400])
        for i in 0..<8 {
            let v = try #require(r.node(at: "soc/virtio_mmio@\(String(0x1000_1000 + i * 0x1000, radix: 16))"))
            #expect(v.strings("compatible") == ["virtio,mmio"])
            #expect(v.cells("interrupts") == [UInt32(1 + i)])
        }
        let chosen = try #require(r.node(at: "chosen"))
        #expect(chosen.strings("bootargs") == ["console=ttyS0 cryptomgr.notests"])
        #expect(chosen.strings("stdout-path") == ["/soc/serial@10000000"])
        #expect(chosen.cells("linux,initrd-start") == [0, 0x8820_0000])
        #expect(chosen.cells("linux,initrd-end") == [0, 0x8830_0000])
        #expect(try FDTReader.decode(Self.virtTree(initrd: nil).build()).root.node(at: "chosen")?.property("linux,initrd-start") == nil)
    }

    @Test func dtcDecodesTheVirtTree() throws {
        guard let dtc = Tools.which("dtc") else {
            print("dtc not installed (apt-get install device-tree-compiler); dtc decoding skipped")
            return
        }
        let dir = TempDir("fdt")
        let path = dir.file("virt.dtb")
        #expect(FileManager.default.createFile(atPath: path, contents: Data(Self.virtTree().build())))
        let r = try run(dtc, ["-I", "dtb", "-O", "dts", path])
        #expect(r.status == 0, "\(r)")
        #expect(!r.stderr.contains("ERROR"), "\(r.stderr)")
        for needle in ["compatible = \"sifive,plic-1.0.0\\0riscv,plic0\";", "riscv,isa = \"rv64imafdc_zicsr_zifencei\";",
                       "bootargs = \"console=ttyS0 cryptomgr.notests\";", "stdout-path = \"/soc/serial@10000000\";",
                       "virtio_mmio@10008000 {", "interrupt-controller;", "reg = <0x00 0x80000000 0x00 0x20000000>;"] {
            #expect(r.stdout.contains(needle), "missing \(needle) in\n\(r.stdout)")
        }
        // And back: dtc re-encodes our source to a blob our reader decodes to the same tree.
        let dts = dir.file("virt.dts"), dtb2 = dir.file("again.dtb")
        try r.stdout.write(toFile: dts, atomically: true, encoding: .utf8)
        let back = try run(dtc, ["-I", "dts", "-O", "dtb", "-o", dtb2, dts])
        #expect(back.status == 0, "\(back)")
        let again = try FDTReader.decode([UInt8](FileManager.default.contents(atPath: dtb2) ?? Data()))
        #expect(again.root == (try FDTReader.decode(Self.virtTree().build())).root)
    }

    @Test(arguments: [
        ("short", [UInt8](repeating: 0, count: 10)),
        ("bad magic", [UInt8](repeating: 0xff, count: 64)),
    ])
    func readerRefusesGarbage(_ name: String, _ bytes: [UInt8]) {
        #expect(throws: MachineError.self) { try FDTReader.decode(bytes) }
    }

    @Test func readerRefusesTruncatedAndCorruptedBlobs() {
        let good = Self.virtTree().build()
        // Every truncation and a corrupted byte at many positions: errors, never a crash.
        for cut in stride(from: 0, to: good.count, by: 37) {
            _ = try? FDTReader.decode(Array(good[0..<cut]))
        }
        for pos in stride(from: 40, to: good.count, by: 13) {
            var b = good
            b[pos] ^= 0xff
            _ = try? FDTReader.decode(b)
        }
        #expect(throws: MachineError.self) { try FDTReader.decode(Array(good[0..<(good.count / 2)])) }
    }
}
