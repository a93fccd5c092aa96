import Foundation
import Testing
import TestSupport
@testable import QMachine

@Suite struct LoaderTests {
    /// A synthetic RISC-V Image header.
    static func header(textOffset: UInt64 = 0x20_0000, imageSize: UInt64 = 0x1e6_c000, magic2: Bool = true, magic1: Bool = true) -> [UInt8] {
        var b = [UInt8](repeating: 0, count: 64)
        b[0] = 0x4d; b[1] = 0x5a                     // "MZ" (EFI stub)
        for i in 0..<8 { b[8 + i] = UInt8(truncatingIfNeeded: textOffset >> (8 * UInt64(i))) }
        for i in 0..<8 { b[16 + i] = UInt8(truncatingIfNeeded: imageSize >> (8 * UInt64(i))) }
        b[32] = 2                                     // version 0.2
        if magic1 { for (i, c) in "RISCV".utf8.enumerated() { b[48 + i] = c } }
        if magic2 { b[56] = 0x52; b[57] = 0x53; b[58] = 0x43; b[59] = 0x05 }
        return b
    }

    @Test func parsesTheImageHeader() throws {
        let h = try LinuxImageHeader(Self.header())
        #expect(h.textOffset == 0x20_0000 && h.imageSize == 0x1e6_c000 && h.version == 2 && !h.isBigEndian)
        _ = try LinuxImageHeader(Self.header(magic2: false))     // the deprecated magic alone
        _ = try LinuxImageHeader(Self.header(magic1: false))
    }

    @Test(arguments: [
        ("empty", [UInt8](), "only 0 bytes"),
        ("ELF", [0x7f, 0x45, 0x4c, 0x46] + [UInt8](repeating: 0, count: 100), "ELF"),
        ("gzip", [0x1f, 0x8b] + [UInt8](repeating: 0, count: 100), "gzip"),
        ("text", Array(String(repeating: "not a kernel\n", count: 10).utf8), "RSC"),
    ])
    func refusesWhatIsNotAnImage(_ name: String, _ bytes: [UInt8], _ hint: String) {
        do {
            _ = try LinuxImageHeader(bytes, name: "kernel 'x'")
            Issue.record("\(name) accepted")
        } catch let e as MachineError {
            #expect(e.code == .badImage)
            #expect(e.message.contains("not a RISC-V Linux Image"), "\(e.message)")
            #expect(e.message.contains(hint), "\(e.message)")
        } catch { Issue.record("\(error)") }
    }

    @Test func layoutFollowsQEMU() throws {
        let h = try LinuxImageHeader(Self.header())
        let l = try LinuxBootLayout(ramBase: 0x8000_0000, ramSize: 512 << 20, kernelFileSize: 31_000_000, header: h,
                                    initrdSize: 1 << 20, fdtSize: 4000)
        #expect(l.kernelAddress == 0x8020_0000)
        #expect(l.initrdStart == 0x8020_0000 + (128 << 20), "min(RAM/2, 128 MiB) past the kernel")
        #expect(l.initrdEnd == l.initrdStart! + (1 << 20))
        #expect(l.fdtAddress == 0x8000_0000 + (512 << 20) - (2 << 20), "top of RAM, 2 MiB aligned")
        // Small RAM: half of it.
        let s = try LinuxBootLayout(ramBase: 0x8000_0000, ramSize: 128 << 20, kernelFileSize: 1 << 20,
                                    header: try LinuxImageHeader(Self.header(imageSize: 2 << 20)), initrdSize: 1 << 20, fdtSize: 4000)
        #expect(s.initrdStart == 0x8020_0000 + (64 << 20))
        // A kernel bigger than the gap: the initrd goes right after it.
        let big = try LinuxBootLayout(ramBase: 0x8000_0000, ramSize: 128 << 20, kernelFileSize: 1 << 20,
                                      header: try LinuxImageHeader(Self.header(imageSize: 70 << 20)), initrdSize: 1 << 20, fdtSize: 4000)
        #expect(big.initrdStart! >= big.kernelEnd)
        #expect(throws: MachineError.self) {
            _ = try LinuxBootLayout(ramBase: 0x8000_0000, ramSize: 32 << 20, kernelFileSize: 1 << 20,
                                    header: try LinuxImageHeader(Self.header(imageSize: 40 << 20)), initrdSize: nil, fdtSize: 4000)
        }
        #expect(throws: MachineError.self) {
            _ = try LinuxBootLayout(ramBase: 0x8000_0000, ramSize: 64 << 20, kernelFileSize: 1 << 20,
                                    header: h, initrdSize: 60 << 20, fdtSize: 4000)
        }
    }

    @Test func initrdFormats() throws {
        #expect(try InitrdFormat.detect(Array("070701000".utf8), name: "i") == .cpio)
        #expect(try InitrdFormat.detect([0x1f, 0x8b, 8, 0], name: "i") == .gzip)
        #expect(try InitrdFormat.detect([0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00, 1], name: "i") == .xz)
        #expect(try InitrdFormat.detect([0x28, 0xb5, 0x2f, 0xfd, 1], name: "i") == .zstd)
        #expect(throws: MachineError.self) { try InitrdFormat.detect(Array("hello world".utf8), name: "i") }
        #expect(throws: MachineError.self) { try InitrdFormat.detect([], name: "i") }
    }

    @Test func driveAndMemoryArguments() throws {
        #expect(try DriveSpec(parsing: "file=/a/b.qcow2,format=qcow2,id=root,readonly=on")
                == DriveSpec(file: "/a/b.qcow2", format: "qcow2", id: "root", readOnly: true))
        #expect(try DriveSpec(parsing: "disk.raw") == DriveSpec(file: "disk.raw"))
        #expect(try DriveSpec(parsing: "file=a,,b.raw,if=virtio").file == "a,b.raw")
        for bad in ["format=raw", "file=x,format=vmdk", "file=x,cache=none", "file=x,readonly=maybe", "file=x,if=ide", ""] {
            #expect(throws: MachineError.self, "\(bad)") { try DriveSpec(parsing: bad) }
        }
        #expect(try MemorySize.parse("512M") == 512 << 20)
        #expect(try MemorySize.parse("1G") == 1 << 30)
        #expect(try MemorySize.parse("256") == 256 << 20)
        #expect(try MemorySize.parse("65536K") == 64 << 20)
        for bad in ["", "12X", "1M", "-5M", "99999999999999999T"] {
            #expect(throws: MachineError.self, "\(bad)") { try MemorySize.parse(bad) }
        }
    }
}

/// A CPU that only records how the machine set it up.
final class FakeCPU: RISCVBootCPU, @unchecked Sendable {
    var pc: UInt64 = 0
    var regs = [UInt64](repeating: 0, count: 32)
    let sei = TestLine(), mei = TestLine()
    var invalidated: [(UInt64, UInt64)] = []
    func setRegister(_ index: Int, _ value: UInt64) { regs[index] = value }
    var supervisorExternalInterrupt: any InterruptLine { sei }
    var machineExternalInterrupt: any InterruptLine { mei }
    func invalidateCode(physicalAddress: UInt64, length: UInt64) { invalidated.append((physicalAddress, length)) }
    var instructionsRetired: UInt64 { 0 }
    func run() -> VCPUExit { .shutdown }
    func requestStop() {}

    static let model = RISCVCPUModel(isa: "rv64imac_zicsr", mmuType: "riscv,sv39", timebaseFrequency: 10_000_000) { _, _, _, _ in FakeCPU() }
}

@Suite struct LoaderMachineTests {
    @Test func machineLoadsKernelInitrdAndDeviceTree() async throws {
        let dir = TempDir("machine")
        let kernel = LoaderTests.header(imageSize: 3 << 20) + [UInt8](repeating: 0x13, count: 8192)
        #expect(FileManager.default.createFile(atPath: dir.file("Image"), contents: Data(kernel)))
        let initrd = Array("070701".utf8) + [UInt8](repeating: 0x30, count: 5000)
        #expect(FileManager.default.createFile(atPath: dir.file("initrd"), contents: Data(initrd)))
        let serial = BufferSerialBackend()
        var config = RISCVVirtMachine.Configuration(kernelPath: dir.file("Image"), serial: serial)
        config.memorySize = 256 << 20
        config.initrdPath = dir.file("initrd")
        config.bootargs = "console=ttyS0 quiet"
        let m = try RISCVVirtMachine(config, cpu: FakeCPU.model)
        let cpu = try #require(m.cpu as? FakeCPU)
        #expect(cpu.pc == 0x8020_0000)
        #expect(cpu.regs[10] == 0 && cpu.regs[11] == m.layout.fdtAddress)
        #expect(m.layout.fdtAddress == 0x8000_0000 + (256 << 20) - (2 << 20))
        #expect(m.layout.initrdStart == 0x8020_0000 + (128 << 20))

        var k = [UInt8](repeating: 0, count: kernel.count)
        try k.withUnsafeMutableBytes { try m.ram.read(into: $0, at: 0x8020_0000) }
        #expect(same(k, kernel))
        var i = [UInt8](repeating: 0, count: initrd.count)
        try i.withUnsafeMutableBytes { try m.ram.read(into: $0, at: m.layout.initrdStart!) }
        #expect(same(i, initrd))
        var dtb = [UInt8](repeating: 0, count: m.deviceTree.count)
        try dtb.withUnsafeMutableBytes { try m.ram.read(into: $0, at: m.layout.fdtAddress) }
        let tree = try FDTReader.decode(dtb).root
        let start = m.layout.initrdStart!
        #expect(tree.node(at: "chosen")?.cells("linux,initrd-start") == [UInt32(start >> 32), UInt32(truncatingIfNeeded: start)])
        #expect(tree.node(at: "chosen")?.strings("bootargs") == ["console=ttyS0 quiet"])
        #expect(tree.node(at: "cpus/cpu@0")?.strings("riscv,isa") == ["rv64imac_zicsr"])

        // The UART's interrupt reaches the hart's S-mode input through the PLIC.
        m.plic.write(offset: 10 * 4, size: 4, value: 1)
        m.plic.write(offset: PLIC.enableBase + PLIC.enableStride, size: 4, value: 1 << 10)
        #expect(m.bus.write(0x1000_0001, size: 1, value: 0x02))    // UART IER: THR empty
        #expect(cpu.sei.level && !cpu.mei.level)
        #expect(m.bus.read(0x0c20_1004, size: 4) == 10)             // claim (context 1)
        #expect(m.bus.read(0x1000_0002, size: 1)! & 0x0f == 0x02)   // IIR: THR empty, now cleared
        m.bus.write(0x0c20_1004, size: 4, value: 10)                 // complete
        #expect(!cpu.sei.level)
        // Eight virtio slots, the first empty one reads device id 0.
        #expect(m.bus.read(0x1000_1000, size: 4) == 0x7472_6976)
        #expect(m.bus.read(0x1000_8008, size: 4) == 0)
        #expect(m.bus.read(0x1000_9000, size: 4) == nil)
        #expect(m.runBlocking() == .shutdown)
    }
}
