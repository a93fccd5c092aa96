import Foundation
import Testing
import QBlock
import TestSupport

/// qemu-iotests of the `auto` group (not in `quick`) made to pass, each compared with QEMU's
/// tools on the same input: 080 (damaged qcow2 headers), 061 (resize and downgrade with
/// internal snapshots), 049 (create options), 126 (colons in file names, the `file:` prefix).
@Suite struct AutoGroupIotestsTests {
    static func be64(_ v: UInt64) -> [UInt8] { (0..<8).map { UInt8(truncatingIfNeeded: v >> (56 - 8 * UInt64($0))) } }
    static func be32(_ v: UInt32) -> [UInt8] { (0..<4).map { UInt8(truncatingIfNeeded: v >> (24 - 8 * UInt32($0))) } }

    /// qemu-io's stderr with its program name as ours prints it.
    static func asIO(_ s: String) -> String { s.replacingOccurrences(of: "qemu-io:", with: "io:") }

    /// A header damage of iotest 080: (offset, bytes) patches on a fresh 64 MiB image.
    struct Damage: CustomStringConvertible, Sendable {
        let name: String
        let patches: [(Int64, [UInt8])]
        var description: String { name }
    }

    static let damages: [Damage] = [
        Damage(name: "huge header size", patches: [(100, be32(0xffff_ffff))]),
        Damage(name: "large header size", patches: [(100, be32(0x7fff_ffff))]),
        Damage(name: "huge backing offset, huge extension", patches: [
            (8, be64(UInt64.max)), (112, be32(0x1234_5678)), (116, be32(0x7fff_ffff))]),
        Damage(name: "extension header cut by the backing name", patches: [
            (8, be64(116)), (112, be32(0x1234_5678)), (116, be32(0x7fff_ffff))]),
        Damage(name: "huge unknown extension", patches: [(112, be32(0x1234_5678)), (116, be32(0x7fff_ffff))]),
        Damage(name: "huge refcount table", patches: [(56, be32(0xffff_ffff))]),
        Damage(name: "refcount table past its limit", patches: [(56, be32(0x0002_0001))]),
        Damage(name: "misaligned refcount table", patches: [(48, be64(0x1234_5678_90ab_cdef))]),
        Damage(name: "huge refcount offset", patches: [(48, be64(0xffff_ffff_ffff_0000)), (56, be32(0x7f))]),
        Damage(name: "huge snapshot count", patches: [(60, be32(0xffff_ffff))]),
        Damage(name: "snapshot count past its limit", patches: [(60, be32(0x7fff_ffff))]),
        Damage(name: "huge snapshot offset", patches: [(64, be64(0xffff_ffff_ffff_0000)), (60, be32(0xffff))]),
        Damage(name: "misaligned snapshot offset, no snapshots", patches: [(64, be64(0x1234_5678_90ab_cdef))]),
        Damage(name: "huge L1 table", patches: [(36, be32(0xffff_ffff))]),
        Damage(name: "L1 table past its limit", patches: [(36, be32(0x7fff_ffff))]),
        Damage(name: "huge L1 offset", patches: [(40, be64(0x7fff_ffff_ffff_0000)), (36, be32(0xffff))]),
        Damage(name: "misaligned L1 offset", patches: [(40, be64(0x1234_5678_90ab_cdef)), (36, be32(1))]),
        Damage(name: "huge backing file name", patches: [(8, be64(0x1000)), (16, be32(0xffff_ffff))]),
    ]

    /// Each damage of iotest 080 gives qemu-io's error ("can't open device PATH: MESSAGE",
    /// without qemu-img's "Could not open" prefix) and status.
    @Test(qemuTrait, arguments: damages)
    func damagedHeaderOpensAsQemuIO(_ damage: Damage) throws {
        let dir = TempDir()
        let image = dir.file("t.qcow2")
        try mustRun("qemu-img", "create", "-q", "-f", "qcow2", image, "64M")
        for (offset, bytes) in damage.patches { try writeFile(image, at: offset, bytes) }
        let before = FileManager.default.contents(atPath: image)
        let ours = try run("io", "-c", "read 0 512", image)
        let theirs = try run("qemu-io", "-c", "read 0 512", image)
        #expect(ours.stderr == Self.asIO(theirs.stderr), "\(damage.name)")
        #expect(ours.stderr.hasPrefix("io: can't open device \(image): "), "\(damage.name): \(ours.stderr)")
        #expect(!ours.stderr.contains("Could not open"), "\(damage.name): \(ours.stderr)")
        #expect(ours.stdout == theirs.stdout && ours.status == theirs.status, "\(damage.name): \(ours) vs \(theirs)")
        #expect(FileManager.default.contents(atPath: image) == before, "\(damage.name): the failed open changed the file")
    }

    /// A file that cannot be opened keeps the file layer's "Could not open" in qemu-io's message.
    @Test(qemuTrait) func missingFileKeepsCouldNotOpen() throws {
        let dir = TempDir()
        let ours = try run("io", "-f", "qcow2", "-c", "read 0 512", dir.file("missing"))
        let theirs = try run("qemu-io", "-f", "qcow2", "-c", "read 0 512", dir.file("missing"))
        #expect(ours.stderr == Self.asIO(theirs.stderr) && ours.status == theirs.status, "\(ours) vs \(theirs)")
        #expect(ours.stderr.contains("Could not open '\(dir.file("missing"))': No such file or directory"), "\(ours)")
    }

    /// img keeps its "Could not open 'NAME': " before a format driver's message (080's L1
    /// table too small, with a snapshot in the image).
    @Test(qemuTrait) func imgInfoKeepsCouldNotOpen() throws {
        let dir = TempDir()
        for name in ["ours.qcow2", "theirs.qcow2"] {
            try mustRun("qemu-img", "create", "-q", "-f", "qcow2", dir.file(name), "64M")
            try mustRun("qemu-img", "snapshot", "-c", "foo", dir.file(name))
            try writeFile(dir.file(name), at: 36, Self.be32(0))
        }
        let ours = try run("img", ["info", "ours.qcow2"], cwd: dir.path)
        let theirs = try run("qemu-img", ["info", "theirs.qcow2"], cwd: dir.path)
        #expect(ours.stderr == "img: Could not open 'ours.qcow2': L1 table is too small\n", "\(ours)")
        #expect(ours.stderr.replacingOccurrences(of: "ours", with: "theirs") == asImg(theirs.stderr))
        #expect(ours.status == theirs.status)
    }

    /// iotest 080, "Hitting snapshot table size limit": a table of 65536 entries that lies
    /// past the end of the file reads as zeroes; a 65537th snapshot is refused with EFBIG.
    @Test(qemuTrait) func snapshotTableLimitAsQemu() throws {
        let dir = TempDir()
        var results: [String: (RunResult, RunResult)] = [:]
        for (tool, io) in [("img", "io"), ("qemu-img", "qemu-io")] {
            let image = dir.file("\(tool).qcow2")
            try mustRun("qemu-img", "create", "-q", "-f", "qcow2", image, "64M")
            try writeFile(image, at: 64, Self.be64(0x0100_0000))
            try writeFile(image, at: 60, Self.be32(0x0001_0000))
            results[tool] = (try run(tool, "snapshot", "-c", "test", image), try run(io, "-c", "read 0 512", image))
        }
        let (oursSnap, oursRead) = try #require(results["img"])
        let (theirsSnap, theirsRead) = try #require(results["qemu-img"])
        #expect(oursSnap.stderr.contains("Could not create snapshot 'test': -27 (File too large)"), "\(oursSnap)")
        #expect(oursSnap.stderr.replacingOccurrences(of: "img.qcow2", with: "qemu-img.qcow2") == asImg(theirsSnap.stderr))
        #expect(oursSnap.status == theirsSnap.status)
        #expect(oursRead.status == 0 && theirsRead.status == 0 && oursRead.stderr.isEmpty, "\(oursRead)")
        #expect(oursRead.stdout.hasPrefix("read 512/512 bytes at offset 0"), "\(oursRead)")
    }

    /// iotest 061, "Testing resize with snapshots": a v2 image with snapshots keeps its size,
    /// a v3 one grows and shrinks; a downgrade is refused while a snapshot has another size.
    @Test(qemuTrait) func resizeAndDowngradeWithSnapshotsAsQemu() throws {
        let dir = TempDir()
        let steps: [[String]] = [
            ["snapshot", "-c", "foo", "{}"],
            ["resize", "{}", "64M"],
            ["amend", "-o", "compat=1.1,size=128M", "{}"],
            ["snapshot", "-c", "bar", "{}"],
            ["resize", "--shrink", "{}", "64M"],
            ["amend", "-o", "compat=0.10,size=32M", "{}"],
            ["snapshot", "-a", "bar", "{}"],
            ["snapshot", "-d", "bar", "{}"],
            ["amend", "-o", "compat=0.10,size=32M", "{}"],
            ["check", "{}"],
        ]
        for name in ["ours.qcow2", "theirs.qcow2"] {
            try mustRun("qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", dir.file(name), "32M")
            try mustRun("qemu-io", "-c", "write -q -P 0x2a 24M 64k", dir.file(name))
        }
        for step in steps {
            let ours = try run("img", step.map { $0 == "{}" ? "ours.qcow2" : $0 }, cwd: dir.path)
            let theirs = try run("qemu-img", step.map { $0 == "{}" ? "theirs.qcow2" : $0 }, cwd: dir.path)
            let cmd = step.joined(separator: " ")
            #expect(ours.stdout.replacingOccurrences(of: "ours", with: "theirs") == theirs.stdout, "stdout of \(cmd)")
            #expect(ours.stderr.replacingOccurrences(of: "ours", with: "theirs") == asImg(theirs.stderr), "stderr of \(cmd)")
            #expect(ours.status == theirs.status, "status of \(cmd)")
            // The header fields 061 prints: version, size, nb_snapshots.
            let o = FileManager.default.contents(atPath: dir.file("ours.qcow2")).map { [UInt8]($0.prefix(72)) }
            let t = FileManager.default.contents(atPath: dir.file("theirs.qcow2")).map { [UInt8]($0.prefix(72)) }
            #expect(o?[4..<8] == t?[4..<8] && o?[24..<32] == t?[24..<32] && o?[60..<64] == t?[60..<64], "header after \(cmd)")
        }
        let messages = try run("img", ["resize", "ours.qcow2", "64M"], cwd: dir.path)
        #expect(messages.stderr == "img: Can't resize a v2 image which has snapshots\n", "\(messages)")
    }

    /// iotest 049: create's `compat` value is checked as QEMU's QAPI member `version`;
    /// `encryption=off` is accepted and printed; `--object` is accepted as by the other
    /// subcommands.
    @Test(qemuTrait) func createOptionsAsQemu() throws {
        let dir = TempDir()
        let cases: [[String]] = [
            ["create", "-f", "qcow2", "-o", "compat=0.42", "{}", "64M"],
            ["create", "-f", "qcow2", "-o", "compat=foobar", "{}", "64M"],
            ["create", "-f", "qcow2", "-o", "encryption=off", "{}", "64M"],
            ["create", "-f", "qcow2", "--object", "secret,id=sec0,data=123456", "-o", "encryption=off", "{}", "64M"],
            ["create", "-f", "qcow2", "--object", "secret,id=sec0", "{}", "64M"],
        ]
        for c in cases {
            let ours = try run("img", c.map { $0 == "{}" ? "ours.qcow2" : $0 }, cwd: dir.path)
            let theirs = try run("qemu-img", c.map { $0 == "{}" ? "theirs.qcow2" : $0 }, cwd: dir.path)
            let cmd = c.joined(separator: " ")
            #expect(ours.stdout.replacingOccurrences(of: "ours", with: "theirs") == theirs.stdout, "stdout of \(cmd)")
            #expect(ours.stderr.replacingOccurrences(of: "ours", with: "theirs") == asImg(theirs.stderr), "stderr of \(cmd)")
            #expect(ours.status == theirs.status, "status of \(cmd)")
        }
        // qcow2 encryption is not implemented: encryption=on is refused, and nothing is created.
        let on = try run("img", ["create", "-f", "qcow2", "-o", "encryption=on", "enc.qcow2", "64M"], cwd: dir.path)
        #expect(on.status == 1 && on.stderr.contains("qcow2 encryption is not supported"), "\(on)")
        #expect(!FileManager.default.fileExists(atPath: dir.file("enc.qcow2")))
    }

    /// iotest 126: a colon after a slash is part of the path; `file:` names the host file
    /// explicitly, and a rest with a colon before any slash is shown as "./REST", its
    /// relative backing file resolved next to it.
    @Test(qemuTrait) func fileProtocolPrefixAsQemu() throws {
        for tool in ["img", "qemu-img"] {
            let dir = TempDir()
            let a = try run(tool, ["create", "-f", "qcow2", "file:\(dir.path)/a:b.qcow2", "64M"])
            #expect(a.status == 0 && FileManager.default.fileExists(atPath: dir.file("a:b.qcow2")), "\(tool): \(a)")
            #expect(a.stdout.hasPrefix("Formatting 'file:\(dir.path)/a:b.qcow2', fmt=qcow2"), "\(tool): \(a)")
            try mustRun(tool, "create", "-q", "-f", "qcow2", "base.qcow2", "64M", cwd: dir.path)
            try mustRun(tool, "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "file:image:top.qcow2",
                        cwd: dir.path)
            #expect(FileManager.default.fileExists(atPath: dir.file("image:top.qcow2")), "\(tool)")
            let info = try run(tool, ["info", "file:image:top.qcow2"], cwd: dir.path)
            #expect(info.status == 0, "\(tool): \(info)")
            let lines = info.stdout.split(separator: "\n")
            #expect(lines.first == "image: ./image:top.qcow2", "\(tool): \(info.stdout)")
            #expect(lines.contains("backing file: base.qcow2 (actual path: ./base.qcow2)"), "\(tool): \(info.stdout)")
        }
        #expect(ProtocolRegistry.strippingFilePrefix("file:/x/a:b") == "/x/a:b")
        #expect(ProtocolRegistry.strippingFilePrefix("file:a:b") == "./a:b")
        #expect(ProtocolRegistry.strippingFilePrefix("file:ab") == "ab")
        #expect(ProtocolRegistry.strippingFilePrefix("nbd:localhost:10809") == "nbd:localhost:10809")
    }

    /// iotest 080, "Invalid snapshot L1 table offset/size": convert -l, amend, snapshot -a,
    /// snapshot -d and check name the bad table as qemu-img does (the table's fault on a line
    /// of its own before the failed operation's errno, and check's "snapshot table entry
    /// corrupted" line).
    @Test(qemuTrait, arguments: [(0x70000, [UInt8](be64(0x400200))), (0x70008, [UInt8](be32(0x1000_0000)))])
    func corruptSnapshotL1AsQemu(offset: Int, bytes: [UInt8]) throws {
        let dir = TempDir()
        for name in ["ours.qcow2", "theirs.qcow2"] {
            try mustRun("qemu-img", "create", "-q", "-f", "qcow2", dir.file(name), "64M")
            try mustRun("qemu-io", "-c", "write -q 0 512", dir.file(name))
            try mustRun("qemu-img", "snapshot", "-c", "test", dir.file(name))
            try writeFile(dir.file(name), at: Int64(offset), bytes)
        }
        let steps: [[String]] = [
            ["convert", "-l", "test", "{}", "{}.snap"], ["amend", "-o", "compat=0.10", "{}"],
            ["snapshot", "-a", "test", "{}"], ["snapshot", "-d", "test", "{}"], ["check", "{}"],
        ]
        for step in steps {
            let ours = try run("img", step.map { $0.replacingOccurrences(of: "{}", with: "ours.qcow2") }, cwd: dir.path)
            let theirs = try run("qemu-img", step.map { $0.replacingOccurrences(of: "{}", with: "theirs.qcow2") }, cwd: dir.path)
            let cmd = step.joined(separator: " ")
            #expect(ours.stderr.replacingOccurrences(of: "ours", with: "theirs") == asImg(theirs.stderr), "stderr of \(cmd)")
            #expect(ours.status == theirs.status, "status of \(cmd)")
        }
    }
}
