import Foundation
import Testing
import QBlock
import TestSupport
@testable import QBlockCore
@testable import QBlockNBDWire
@testable import QBlockBitmaps
@testable import QBlockGraph
@testable import QBlockDrivers
@testable import QBlockOpen
@testable import QBlockOperations
@testable import QBlockJobs
@testable import QBlockNBDServer
@testable import QBlockMonitor

/// A corpus of damaged images: each must give a clear, typed error — never a crash, a hang,
/// or (opened read-only) a changed byte.
@Suite struct Qcow2CorruptImageTests {
    struct Damage: CustomStringConvertible, Sendable {
        let name: String
        /// Patches applied to a valid image: (file offset, bytes). An offset of -1 truncates to the count.
        let patch: @Sendable (inout [UInt8], _ l2Offset: Int) -> Void
        /// A fragment the error message must contain.
        let expect: String
        var description: String { name }
    }

    static func be64(_ v: UInt64) -> [UInt8] { (0..<8).map { UInt8(truncatingIfNeeded: v >> (56 - 8 * UInt64($0))) } }
    static func be32(_ v: UInt32) -> [UInt8] { (0..<4).map { UInt8(truncatingIfNeeded: v >> (24 - 8 * UInt32($0))) } }

    static let corpus: [Damage] = [
        Damage(name: "truncated header", patch: { b, _ in b = Array(b[0..<40]) }, expect: "not in qcow2 format"),
        Damage(name: "version 4", patch: { b, _ in b.replaceSubrange(4..<8, with: be32(4)) }, expect: "Unsupported qcow2 version 4"),
        Damage(name: "cluster bits 30", patch: { b, _ in b.replaceSubrange(20..<24, with: be32(30)) }, expect: "Unsupported cluster size: 2^30"),
        Damage(name: "cluster bits 0", patch: { b, _ in b.replaceSubrange(20..<24, with: be32(0)) }, expect: "Unsupported cluster size"),
        Damage(name: "unaligned L1", patch: { b, _ in b.replaceSubrange(40..<48, with: be64(0x30001)) }, expect: "Active L1 table offset invalid"),
        Damage(name: "L1 past end", patch: { b, _ in b.replaceSubrange(40..<48, with: be64(1 << 40)) }, expect: "points past the end"),
        Damage(name: "huge L1", patch: { b, _ in b.replaceSubrange(36..<40, with: be32(0xffff_ffff)) }, expect: "Active L1 table too large"),
        Damage(name: "L1 too small", patch: { b, _ in b.replaceSubrange(24..<32, with: be64(1 << 50)) }, expect: "L1 table is too small"),
        Damage(name: "unaligned refcount table", patch: { b, _ in b.replaceSubrange(48..<56, with: be64(0x10010)) }, expect: "Reference count table offset invalid"),
        Damage(name: "refcount table past end", patch: { b, _ in b.replaceSubrange(48..<56, with: be64(1 << 40)) }, expect: "points past the end"),
        Damage(name: "huge refcount table", patch: { b, _ in b.replaceSubrange(56..<60, with: be32(1 << 20)) }, expect: "Reference count table too large"),
        Damage(name: "unknown incompatible feature", patch: { b, _ in b.replaceSubrange(72..<80, with: be64(1 << 10)) }, expect: "Unsupported qcow2 feature(s)"),
        Damage(name: "refcount order 7", patch: { b, _ in b.replaceSubrange(96..<100, with: be32(7)) }, expect: "Reference count entry width too large"),
        Damage(name: "header length past cluster", patch: { b, _ in b.replaceSubrange(100..<104, with: be32(1 << 20)) }, expect: "exceeds cluster size"),
        Damage(name: "backing name too long", patch: { b, _ in
            b.replaceSubrange(8..<16, with: be64(512)); b.replaceSubrange(16..<20, with: be32(5000)) }, expect: "Backing file name too long"),
        Damage(name: "encrypted", patch: { b, _ in b.replaceSubrange(32..<36, with: be32(1)) }, expect: "Encrypted"),
        Damage(name: "unaligned L2 entry", patch: { b, l2 in b.replaceSubrange(l2..<(l2 + 8), with: be64((1 << 63) | 0x50201)) }, expect: "unaligned"),
        Damage(name: "L2 table past end", patch: { b, _ in b.replaceSubrange(0x30000..<0x30008, with: be64((1 << 63) | (1 << 41))) }, expect: "past the end"),
        // iotests 080: offsets past Int64.max must be refused, not trap.
        Damage(name: "snapshot table offset past Int64.max", patch: { b, _ in
            b.replaceSubrange(60..<64, with: be32(1)); b.replaceSubrange(64..<72, with: be64(0xffff_ffff_ffff_0000)) },
               expect: "Snapshot table offset invalid"),
        // iotests 080, in QEMU's order and words (qcow2_do_open, qcow2_validate_table).
        Damage(name: "header length 2^32-1", patch: { b, _ in b.replaceSubrange(100..<104, with: be32(0xffff_ffff)) },
               expect: "qcow2 header exceeds cluster size"),
        Damage(name: "backing offset past the cluster", patch: { b, _ in b.replaceSubrange(8..<16, with: be64(UInt64.max)) },
               expect: "Invalid backing file offset"),
        Damage(name: "extension header cut by the backing name", patch: { b, _ in
            b.replaceSubrange(8..<16, with: be64(116)); b.replaceSubrange(112..<116, with: be32(0x1234_5678))
            b.replaceSubrange(116..<120, with: be32(0x7fff_ffff)) }, expect: "Header extension too large"),
        Damage(name: "huge unknown extension", patch: { b, _ in
            b.replaceSubrange(112..<116, with: be32(0x1234_5678)); b.replaceSubrange(116..<120, with: be32(0x7fff_ffff)) },
               expect: "Header extension too large"),
        Damage(name: "no refcount table", patch: { b, _ in b.replaceSubrange(56..<60, with: be32(0)) },
               expect: "Image does not contain a reference count table"),
        Damage(name: "refcount table offset past Int64.max", patch: { b, _ in
            b.replaceSubrange(48..<56, with: be64(0xffff_ffff_ffff_0000)); b.replaceSubrange(56..<60, with: be32(0x7f)) },
               expect: "Reference count table offset invalid"),
        Damage(name: "2^32-1 snapshots", patch: { b, _ in b.replaceSubrange(60..<64, with: be32(0xffff_ffff)) },
               expect: "Snapshot table too large"),
        Damage(name: "misaligned snapshot table, no snapshots", patch: { b, _ in
            b.replaceSubrange(64..<72, with: be64(0x1234_5678_90ab_cdef)) }, expect: "Snapshot table offset invalid"),
        Damage(name: "L1 table offset past Int64.max", patch: { b, _ in
            b.replaceSubrange(40..<48, with: be64(0x7fff_ffff_ffff_0000)); b.replaceSubrange(36..<40, with: be32(0xffff)) },
               expect: "Active L1 table offset invalid"),
        Damage(name: "virtual size 2^64-1", patch: { b, _ in b.replaceSubrange(24..<32, with: be64(UInt64.max)) },
               expect: "Image is too big"),
        Damage(name: "huge backing file name", patch: { b, _ in
            b.replaceSubrange(8..<16, with: be64(0x1000)); b.replaceSubrange(16..<20, with: be32(0xffff_ffff)) },
               expect: "Backing file name too long"),
        Damage(name: "unknown compression type", patch: { b, _ in b[104] = 7 }, expect: "qcow2: unknown compression type: 7"),
        Damage(name: "compression type bit without a type", patch: { b, _ in b[79] |= 0x08 },
               expect: "Compression type incompatible feature bit must not be set"),
        Damage(name: "snapshot with too much extra data", patch: { b, _ in
            // One snapshot entry at cluster 5 (past the data): extra_data_size 2000.
            b.replaceSubrange(60..<64, with: be32(1)); b.replaceSubrange(64..<72, with: be64(0x50000))
            if b.count < 0x50000 + 64 { b.append(contentsOf: [UInt8](repeating: 0, count: 0x50000 + 64 - b.count)) }
            b.replaceSubrange(0x50024..<0x50028, with: be32(2000)) }, expect: "Too much extra metadata in snapshot table entry 0"),
        Damage(name: "unaligned L2 table", patch: { b, _ in b.replaceSubrange(0x30000..<0x30008, with: be64((1 << 63) | 0x40200)) }, expect: "unaligned"),
    ]

    /// A valid 1 MiB image with data in its first cluster; returns (bytes, L2 table offset).
    static func validImage(_ dir: String) async throws -> ([UInt8], Int) {
        let path = dir + "/valid.qcow2"
        try await Qcow2Node.create(path: path, size: 1 << 20, options: Qcow2CreateOptions())
        let n = try await ImageOpener.open(path)
        try await n.write(at: 0, bytes: [UInt8](repeating: 0x5a, count: 4096))
        try await n.close()
        let bytes = try [UInt8](Data(contentsOf: URL(fileURLWithPath: path)))
        let l1 = Int(bytes.be64(40))
        let l2 = Int(bytes.be64(l1) & 0x00ff_ffff_ffff_fe00)
        return (bytes, l2)
    }

    @Test(arguments: corpus)
    func damagedImageGivesClearError(_ damage: Damage) async throws {
        let dir = try tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var (bytes, l2) = try await Self.validImage(dir)
        damage.patch(&bytes, l2)
        let path = dir + "/bad.qcow2"
        #expect(FileManager.default.createFile(atPath: path, contents: Data(bytes)))
        var message = ""
        do {
            let node = try await ImageOpener.open(path, options: OpenOptions(format: "qcow2", readOnly: true))
            do {
                _ = try await node.read(at: 0, count: 1 << 20)
            } catch let e as BlockError {
                message = e.message
            }
            try await node.close()
        } catch let e as BlockError {
            message = e.message
        }
        #expect(message.contains(damage.expect), "\(damage.name): got '\(message)'")
        let after = try [UInt8](Data(contentsOf: URL(fileURLWithPath: path)))
        #expect(after == bytes, "\(damage.name): a read-only open changed the file")
    }

    /// A snapshot table that lies past the end of the file reads as zeroes, as QEMU's reads
    /// past the end do (iotests 080 puts 65536 entries there): the image opens and reads.
    @Test func snapshotTablePastEndReadsAsZeroes() async throws {
        let dir = try tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var (bytes, _) = try await Self.validImage(dir)
        bytes.replaceSubrange(60..<64, with: Self.be32(0x1_0000))
        bytes.replaceSubrange(64..<72, with: Self.be64(1 << 24))
        let path = dir + "/far.qcow2"
        #expect(FileManager.default.createFile(atPath: path, contents: Data(bytes)))
        let node = try await ImageOpener.open(path, options: OpenOptions(format: "qcow2", readOnly: true))
        #expect(try await node.read(at: 0, count: 4) == [0x5a, 0x5a, 0x5a, 0x5a])
        #expect((node as? Qcow2Node)?.snapshots().count == 0x1_0000)
        try await node.close()
        #expect(try [UInt8](Data(contentsOf: URL(fileURLWithPath: path))) == bytes)
    }

    /// A snapshot whose L1 table offset is past Int64.max is refused where it is used
    /// (apply, check), never a trap.
    @Test func snapshotL1OffsetPastInt64Max() async throws {
        let dir = try tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/snap.qcow2"
        try await Qcow2Node.create(path: path, size: 1 << 20, options: Qcow2CreateOptions())
        let n = try #require(try await ImageOpener.open(path) as? Qcow2Node)
        try await n.createSnapshot(name: "test")
        try await n.close()
        var bytes = try [UInt8](Data(contentsOf: URL(fileURLWithPath: path)))
        let table = Int(bytes.be64(64))
        bytes.replaceSubrange(table..<(table + 8), with: Self.be64(0xffff_ffff_ffff_0000))
        #expect(FileManager.default.createFile(atPath: path, contents: Data(bytes)))
        let m = try #require(try await ImageOpener.open(path) as? Qcow2Node)
        do {
            try await m.applySnapshot(idOrName: "test")
            Issue.record("a snapshot with an invalid L1 offset was applied")
        } catch let e as BlockError {
            #expect(e.message.contains("Snapshot L1 table offset invalid"), "\(e.message)")
        }
        let result = try await m.check(repair: nil)
        #expect(result.corruptions > 0)
        try? await m.close()
    }

    @Test func wrongMagicWithExplicitFormat() async throws {
        let dir = try tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/plain.raw"
        #expect(FileManager.default.createFile(atPath: path, contents: Data(count: 1 << 20)))
        await #expect(throws: BlockError.self) {
            _ = try await ImageOpener.open(path, options: OpenOptions(format: "qcow2", readOnly: true))
        }
    }

    @Test func backingLoopAndMissingBacking() async throws {
        let dir = try tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var o = Qcow2CreateOptions()
        o.backingFile = "b.qcow2"
        o.backingFormat = "qcow2"
        try await Qcow2Node.create(path: dir + "/a.qcow2", size: 1 << 20, options: o)
        do {
            _ = try await ImageOpener.open(dir + "/a.qcow2")
            Issue.record("missing backing file was not reported")
        } catch let e as BlockError {
            #expect(e.message.contains("Could not open backing file"), "\(e.message)")
            #expect(e.message.contains("No such file or directory"), "\(e.message)")
        }
        o.backingFile = "a.qcow2"
        try await Qcow2Node.create(path: dir + "/b.qcow2", size: 1 << 20, options: o)
        do {
            _ = try await ImageOpener.open(dir + "/a.qcow2")
            Issue.record("backing loop was not reported")
        } catch let e as BlockError {
            #expect(e.message.contains("loop"), "\(e.message)")
        }
    }

    @Test func corruptBitRefusesReadWrite() async throws {
        let dir = try tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var (bytes, _) = try await Self.validImage(dir)
        bytes[79] |= 0x02
        let path = dir + "/c.qcow2"
        #expect(FileManager.default.createFile(atPath: path, contents: Data(bytes)))
        do {
            _ = try await ImageOpener.open(path)
            Issue.record("corrupt image opened read-write")
        } catch let e as BlockError {
            #expect(e.message.contains("Image is corrupt; cannot be opened read/write"))
        }
        let ro = try await ImageOpener.open(path, options: OpenOptions(readOnly: true))
        #expect(try await ro.read(at: 0, count: 4) == [0x5a, 0x5a, 0x5a, 0x5a])
        try await ro.close()
    }

    @Test func corruptionFoundByWriterMarksImageCorrupt() async throws {
        let dir = try tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var (bytes, l2) = try await Self.validImage(dir)
        bytes.replaceSubrange(l2..<(l2 + 8), with: Self.be64((1 << 63) | 0x50201))
        let path = dir + "/c.qcow2"
        #expect(FileManager.default.createFile(atPath: path, contents: Data(bytes)))
        let n = try await ImageOpener.open(path)
        await #expect(throws: BlockError.self) { _ = try await n.read(at: 0, count: 512) }
        try? await n.close()
        if haveQemuImg {
            let (_, out, _) = try sh(["qemu-img", "info", "--output=json", path])
            #expect(out.contains("\"corrupt\": true"), "\(out)")
        }
    }
}
