import Foundation

/// The 64-byte header at the start of a RISC-V Linux `Image` (the kernel's
/// Documentation/arch/riscv/boot-image-header.rst):
///
/// ```
///  0  u32 code0          executable code (an EFI stub starts with "MZ")
///  4  u32 code1
///  8  u64 text_offset    image load offset from the start of RAM, little-endian
/// 16  u64 image_size     effective image size (bss included), little-endian
/// 24  u64 flags
/// 32  u32 version        header version
/// 36  u32 res1
/// 40  u64 res2
/// 48  u64 magic          "RISCV\0\0\0" (deprecated)
/// 56  u32 magic2         "RSC\x05"
/// 60  u32 res3           PE/COFF header offset
/// ```
public struct LinuxImageHeader: Sendable, Equatable {
    /// The header's size in bytes.
    public static let size = 64
    /// The deprecated `magic` field at offset 48: "RISCV" and three NULs.
    public static let magic: [UInt8] = Array("RISCV".utf8) + [0, 0, 0]
    /// The `magic2` field at offset 56: "RSC\x05".
    public static let magic2: [UInt8] = Array("RSC".utf8) + [0x05]

    /// Where the image must be loaded, in bytes from the start of RAM (`text_offset`).
    public var textOffset: UInt64
    /// How much memory the kernel occupies once running, bss included (`image_size`), in bytes.
    public var imageSize: UInt64
    /// The header's `flags` (bit 0: big-endian kernel).
    public var flags: UInt64
    /// The header version (major in the high 16 bits, minor in the low 16).
    public var version: UInt32

    /// Parses the header.
    /// - Throws: ``MachineError`` `.badImage` when `bytes` do not start with a RISC-V Image header.
    public init(_ bytes: [UInt8], name: String = "kernel") throws {
        guard bytes.count >= Self.size else {
            throw MachineError(.badImage, "\(name) is not a RISC-V Linux Image: only \(bytes.count) bytes", operation: "load kernel")
        }
        let m1 = Array(bytes[48..<56]), m2 = Array(bytes[56..<60])
        guard m2 == Self.magic2 || m1 == Self.magic else {
            var what = "no \"RSC\\x05\" magic at offset 56"
            if bytes.starts(with: [0x7f, 0x45, 0x4c, 0x46]) { what = "it is an ELF file (vmlinux); use the Image" }
            else if bytes.starts(with: [0x1f, 0x8b]) { what = "it is gzip-compressed; decompress it first" }
            throw MachineError(.badImage, "\(name) is not a RISC-V Linux Image (\(what))", operation: "load kernel")
        }
        func le64(_ o: Int) -> UInt64 { (0..<8).reduce(0) { $0 | UInt64(bytes[o + $1]) << (8 * $1) } }
        func le32(_ o: Int) -> UInt32 { (0..<4).reduce(0) { $0 | UInt32(bytes[o + $1]) << (8 * $1) } }
        textOffset = le64(8)
        imageSize = le64(16)
        flags = le64(24)
        version = le32(32)
    }

    /// Whether the kernel is big-endian (flags bit 0); this machine only runs little-endian ones.
    public var isBigEndian: Bool { flags & 1 != 0 }
}

/// Where the pieces of a Linux boot go in guest RAM, computed as QEMU's RISC-V boot code
/// does (hw/riscv/boot.c): the kernel 2 MiB into RAM, the initrd min(RAM/2, 128 MiB) past
/// the kernel (or right after the kernel when that is too close), the DTB at the top of
/// RAM aligned down to 2 MiB.
public struct LinuxBootLayout: Sendable, Equatable {
    /// Guest-physical address the kernel is loaded at and entered.
    public var kernelAddress: UInt64
    /// The first address past the kernel's `image_size`.
    public var kernelEnd: UInt64
    /// Guest-physical address of the initrd, if there is one.
    public var initrdStart: UInt64?
    /// The first address past the initrd (`linux,initrd-end`), if there is one.
    public var initrdEnd: UInt64?
    /// Guest-physical address of the device tree blob (in `a1` at entry).
    public var fdtAddress: UInt64

    static let twoMiB: UInt64 = 2 << 20

    /// - Throws: `.badImage` when the pieces do not fit in RAM.
    public init(ramBase: UInt64, ramSize: UInt64, kernelFileSize: UInt64, header: LinuxImageHeader,
                initrdSize: UInt64?, fdtSize: UInt64) throws {
        let ramEnd = ramBase + ramSize
        kernelAddress = ramBase + Self.twoMiB
        let footprint = max(header.imageSize, kernelFileSize)
        kernelEnd = kernelAddress + footprint
        // The DTB: below min(RAM end, 3 GiB), 2 MiB aligned, as QEMU places it.
        let top = ramBase < 3 << 30 ? min(ramEnd, 3 << 30) : ramEnd
        guard fdtSize < top - ramBase else {
            throw MachineError(.badImage, "device tree of \(fdtSize) bytes does not fit in RAM", operation: "load")
        }
        fdtAddress = (top - fdtSize) & ~(Self.twoMiB - 1)
        guard kernelEnd <= fdtAddress else {
            throw MachineError(.badImage, "kernel of \(footprint) bytes does not fit in \(ramSize >> 20) MiB of RAM", operation: "load kernel")
        }
        if let initrdSize {
            var start = kernelAddress + min(ramSize / 2, 128 << 20)
            if start < kernelEnd { start = (kernelEnd + 0xfff) & ~0xfff }
            guard start + initrdSize <= fdtAddress else {
                throw MachineError(.badImage, "initrd of \(initrdSize) bytes does not fit in RAM after the kernel", operation: "load initrd")
            }
            initrdStart = start
            initrdEnd = start + initrdSize
        }
    }
}

/// Reads kernel and initrd files with errors worded for the user.
public enum BootFiles {
    /// Reads the whole file at `path`; `what` ("kernel", "initrd", "firmware") names it in
    /// errors.
    /// - Throws: ``MachineError`` `.badImage` when the file is missing, a directory or unreadable.
    public static func read(_ path: String, what: String) throws -> [UInt8] {
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: path, isDirectory: &isDir) else {
            throw MachineError(.badImage, "\(what) '\(path)' does not exist", operation: "load \(what)")
        }
        guard !isDir.boolValue else {
            throw MachineError(.badImage, "\(what) '\(path)' is a directory", operation: "load \(what)")
        }
        guard let d = FileManager.default.contents(atPath: path) else {
            throw MachineError(.badImage, "cannot read \(what) '\(path)'", operation: "load \(what)")
        }
        return [UInt8](d)
    }
}

/// The formats the kernel's initramfs unpacker accepts (init/initramfs.c and
/// lib/decompress.c): a cpio "newc" archive, or one compressed with gzip, bzip2, lzma,
/// xz, lzo, lz4 or zstd.
public enum InitrdFormat: String, Sendable {
    case cpio, gzip, bzip2, lzma, xz, lzo, lz4, zstd

    /// Recognises the initrd by its first bytes.
    /// - Throws: `.badImage` when it is none of the accepted formats (the guest kernel would
    ///   otherwise panic with "invalid magic" and never come back).
    public static func detect(_ b: [UInt8], name: String) throws -> InitrdFormat {
        func starts(_ m: [UInt8]) -> Bool { b.starts(with: m) }
        if starts(Array("07070".utf8)) && b.count > 5 && (b[5] == UInt8(ascii: "1") || b[5] == UInt8(ascii: "2")) { return .cpio }
        if starts([0x1f, 0x8b]) || starts([0x1f, 0x9e]) { return .gzip }
        if starts(Array("BZh".utf8)) { return .bzip2 }
        if starts([0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00]) { return .xz }
        if starts([0x89, 0x4c, 0x5a, 0x4f]) { return .lzo }
        if starts([0x02, 0x21, 0x4c, 0x18]) { return .lz4 }
        if starts([0x28, 0xb5, 0x2f, 0xfd]) { return .zstd }
        if starts([0x5d, 0x00, 0x00]) { return .lzma }
        throw MachineError(.badImage, "initrd '\(name)' is neither a cpio archive nor a compressed one (gzip, bzip2, lzma, xz, lzo, lz4, zstd)",
                           operation: "load initrd")
    }
}
