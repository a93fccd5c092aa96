import Foundation
import Testing
import QBlock
import TestSupport

/// `json:` file names, `--image-opts`, qemu-io's `open -o` and `--object secret`: the same
/// command lines through qemu-io/qemu-img and io/img must print the same (timings and the
/// program name masked) and exit the same, and leave the same image bytes.
let driveIOScenarios: [[String]] = [
    // json: file names, nested and with dotted keys; an option nobody reads.
    ["-c", "write -P 0x11 0 64k", "-c", "read -P 0x11 0 64k", #"json:{"driver":"qcow2","file":{"driver":"file","filename":"IMG"}}"#],
    ["-c", "read -P 0 0 4k", #"json:{"driver":"qcow2","file.filename":"IMG","l2-cache-size":"1M"}"#],
    ["-c", "read 0 1", #"json:{"driver":"qcow2","file":{"driver":"file","filename":"IMG","bogus":1}}"#],
    ["-c", "read 0 1", "json:[1]"],
    ["-f", "raw", "-c", "read -P 0x51 0 1", #"json:{"driver":"qcow2","file.filename":"IMG"}"#],
    // --image-opts, with string values typed as each option needs, and its exclusions.
    ["--image-opts", "-c", "write -P 0x22 4k 4k", "-c", "read -P 0x22 4k 4k", "driver=qcow2,file.filename=IMG,l2-cache-size=1M,lazy-refcounts=off"],
    ["--image-opts", "-c", "read 0 1", "file.filename=IMG"],
    ["--image-opts", "-c", "read 0 1", "IMG,driver=qcow2"],
    ["-c", "open -o driver=qcow2,lazy-refcounts IMG", "-c", "read 0 1"],
    ["--image-opts", "-f", "qcow2", "-c", "read 0 1", "driver=qcow2,file.filename=IMG"],
    ["--image-opts", "-c", "close", "-c", "open -o driver=qcow2 IMG", "driver=qcow2,file.filename=IMG"],
    ["-U", "--image-opts", "-c", "read 0 1", "driver=qcow2,file.filename=IMG"],
    ["-r", "-U", "--image-opts", "-c", "read 0 1", "driver=qcow2,file.filename=IMG"],
    ["-r", "-U", "--image-opts", "-c", "read 0 1", "driver=qcow2,file.filename=IMG,force-share=off"],
    ["-r", "-U", "--image-opts", "-c", "read 0 1", "driver=qcow2,file.filename=IMG,force-share=on"],
    // open -o with any options, merged with the path.
    ["-c", "open -o driver=qcow2 IMG", "-c", "read -P 0 0 4k"],
    ["-c", "open -o l2-cache-size=1M,refcount-cache-size=0.25M IMG", "-c", "write -P 3 0 1k", "-c", "read -P 3 0 1k"],
    ["-c", "open -o l2-cache-size=1M,foo=bar IMG"],
    ["-c", "open -o lazy-refcounts=maybe IMG"],
    ["-c", "open -o l2-cache-size=1Q IMG"],
    ["-c", "open -o driver=nosuch IMG"],
    ["-c", "open -o driver=qcow2,file.driver=qcow2,file.file.filename=IMG"],
    ["-c", "open -o driver=file,filename=IMG", "-c", "read -P 0x51 0 4"],
    ["-c", "open -o driver=qcow2,read-only=on IMG"],
    ["-c", "open -r -o driver=qcow2,read-only=off IMG", "-c", "write -P 9 0 1"],
    ["-c", "open -o driver=qcow2,backing=null IMG", "-c", "read -P 0 0 1"],
    ["-c", "open -o driver=qcow2,backing=nosuch IMG"],
    ["-c", "open -s -o driver=qcow2 IMG", "-c", "write -P 0x44 0 4k", "-c", "read -P 0x44 0 4k"],
    ["-c", "open -o driver=qcow2,file.aio=native,cache.direct=on IMG", "-c", "write -P 5 0 4k", "-c", "read -P 5 0 4k"],
    // --object secret.
    ["--object", "secret,id=sec0,data=123456", "-c", "read 0 512", "IMG"],
    ["--object", "secret,id=sec0,data=MTIzNDU2,format=base64", "-c", "read 0 512", "IMG"],
    ["--object", "secret,id=sec0", "-c", "read 0 512", "IMG"],
    ["--object", "foo,id=x", "-c", "read 0 512", "IMG"],
]

/// qemu-img subcommands with `--image-opts`, `json:` names and `--object`.
let driveImgScenarios: [[String]] = [
    ["info", "--image-opts", "driver=qcow2,file.filename=IMG"],
    ["info", #"json:{"driver":"qcow2","file":{"driver":"file","filename":"IMG"}}"#],
    ["info", "-f", "qcow2", "--image-opts", "driver=qcow2,file.filename=IMG"],
    ["info", "--image-opts", "driver=qcow2,file.filename=IMG,bogus=1"],
    ["info", "--image-opts", #"json:{"driver":"qcow2","file.filename":"IMG"}"#],
    ["info", "--image-opts", "IMG,driver=qcow2"],
    ["map", "--image-opts", "driver=raw,offset=64k,size=64k,file.filename=IMG"],
    ["check", "--image-opts", "driver=raw,file.filename=IMG"],
    ["map", "--output=json", "--image-opts", "driver=qcow2,file.driver=file,file.filename=IMG"],
    ["check", #"json:{"driver":"qcow2","file.filename":"IMG"}"#],
    ["info", "-U", "--image-opts", "driver=qcow2,file.filename=IMG,force-share=off"],
    ["info", "-U", "--image-opts", "driver=qcow2,file.filename=IMG,force-share=on"],
    ["compare", "--image-opts", "driver=qcow2,file.filename=IMG", "file.filename=IMG,l2-cache-size=512k"],
    ["compare", "IMG", #"json:{"driver":"qcow2","file.filename":"IMG"}"#],
    ["measure", "-O", "qcow2", "--image-opts", "driver=qcow2,file.filename=IMG"],
    ["info", "--object", "secret,id=sec0,data=abc", "IMG"],
    ["info", "--object", "secret,id=sec0,file=/nonexistent/secret", "IMG"],
]

@Suite("drive options in the tools")
struct DriveOptionsToolTests {
    @Test("io matches qemu-io with json:, --image-opts, open -o and --object",
          .enabled(if: IOToolHarness.haveQemu, "needs qemu-io, qemu-img and the built io tool"),
          arguments: driveIOScenarios)
    func ioMatchesQemuIO(_ args: [String]) throws {
        let c = try IOToolHarness.compare(args, size: "4M", format: "qcow2")
        #expect(c.io.stdout == c.qemu.stdout)
        #expect(c.io.stderr == c.qemu.stderr)
        #expect(c.io.status == c.qemu.status)
        #expect(c.ioImage == c.qemuImage, "images differ after the same commands")
    }

    @Test("img matches qemu-img with json:, --image-opts and --object",
          .enabled(if: IOToolHarness.haveQemu && Tools.executable("img") != nil, "needs qemu-img and the built img tool"),
          arguments: driveImgScenarios)
    func imgMatchesQemuImg(_ args: [String]) throws {
        let dir = try IOToolHarness.TempDir()
        let img = dir.path + "/t.qcow2"
        _ = try IOToolHarness.run(IOToolHarness.qemuImg!, ["create", "-q", "-f", "qcow2", img, "4M"])
        _ = try IOToolHarness.run(IOToolHarness.qemuIO!, ["-c", "write -P 7 64k 64k", img])
        let argv = args.map { $0.replacingOccurrences(of: "IMG", with: img) }
        let q = try IOToolHarness.run(IOToolHarness.qemuImg!, argv)
        let i = try IOToolHarness.run(Tools.executable("img")!, argv)
        #expect(i.stdout == q.stdout)
        #expect(i.stderr == q.stderr.replacingOccurrences(of: "qemu-img:", with: "img:"))
        #expect(i.status == q.status)
    }

    @Test("a backing file named by a json: name opens through the options",
          .enabled(if: IOToolHarness.haveQemu, "needs qemu-io, qemu-img and the built io tool"))
    func jsonBackingName() throws {
        let dir = try IOToolHarness.TempDir()
        let base = dir.path + "/b.qcow2", top = dir.path + "/t.qcow2"
        _ = try IOToolHarness.run(IOToolHarness.qemuImg!, ["create", "-q", "-f", "qcow2", base, "1M"])
        _ = try IOToolHarness.run(IOToolHarness.qemuIO!, ["-c", "write -P 0x11 0 64k", base])
        let backing = #"json:{"driver":"qcow2","file":{"driver":"file","filename":"BASE"}}"#.replacingOccurrences(of: "BASE", with: base)
        _ = try IOToolHarness.run(IOToolHarness.qemuImg!, ["create", "-q", "-f", "qcow2", "-b", backing, "-F", "qcow2", top])
        let args = ["--image-opts", "-c", "read -P 0x11 0 64k", "driver=qcow2,file.filename=\(top)"]
        let q = try IOToolHarness.run(IOToolHarness.qemuIO!, args)
        let i = try IOToolHarness.run(IOToolHarness.ioBinary!, args)
        #expect(IOToolHarness.mask(i.stdout, image: top, program: "io") == IOToolHarness.mask(q.stdout, image: top, program: "qemu-io"))
        #expect(i.stderr == "" && q.stderr == "")
        #expect(i.status == 0 && q.status == 0)
    }

    @Test("QemuOpts strings: ',,' escapes, implied key, bare flags")
    func parseOptionStrings() throws {
        var warnings: [String] = []
        let d = try DriveOptions.parse("a.qcow2,driver=qcow2,file.filename=/x,,y,read-only,noauto,id=x", impliedKey: "file",
                                       warning: { warnings.append($0) })
        #expect(warnings == ["short-form boolean option 'read-only' deprecated\nPlease use read-only=on instead",
                             "short-form boolean option 'noauto' deprecated\nPlease use auto=off instead"])
        #expect(d["id"] == nil)
        #expect(d["file"] == .string("a.qcow2"))
        #expect(d["file.filename"] == .string("/x,y"))
        #expect(d["read-only"] == .string("on"))
        #expect(d["auto"] == .string("off"))
        let nested = try DriveOptions.crumple(d.filtering { $0 != "file" })
        guard case .dict(let file)? = nested["file"] else {
            Issue.record("file is not an object")
            return
        }
        #expect(file["filename"] == .string("/x,y"))
        #expect(throws: QMPError.self) { try DriveOptions.crumple(try DriveOptions.parse("file=a,file.filename=b")) }
    }

    @Test("json: file names flatten nested objects and keep dotted keys")
    func jsonFilenames() throws {
        let d = try DriveOptions.parseJSONFilename(#"json:{'driver': 'qcow2', 'file': {'filename': '/x'}, 'backing.driver': 'raw'}"#)
        #expect(d["file.filename"] == .string("/x"))
        #expect(d["backing.driver"] == .string("raw"))
        #expect(throws: QMPError.self) { try DriveOptions.parseJSONFilename("json:[1]") }
    }

    @Test("the opened tree closes with its root and releases its image locks")
    func rootOwnsTree() async throws {
        let dir = try IOToolHarness.TempDir()
        let path = dir.path + "/a.qcow2"
        try await Qcow2Format.create(path: path, size: 1 << 20, options: [])
        let opts = try DriveOptions.parse("driver=qcow2,file.driver=file,file.filename=\(path)")
        let node = try await DriveOpener.open(filename: nil, options: opts, defaults: OpenOptions())
        // A second writer is refused while the first holds the write lock.
        await #expect(throws: (any Error).self) {
            let other = try await DriveOpener.open(filename: path, options: QObject.Dict(), defaults: OpenOptions())
            try await other.close()
        }
        try await node.write(at: 0, bytes: [UInt8](repeating: 9, count: 512))
        try await node.close()
        let again = try await ImageOpener.open(path, options: OpenOptions(format: "qcow2"))
        #expect(try await again.read(at: 0, count: 512) == [UInt8](repeating: 9, count: 512))
        try await again.close()
    }
}

extension QObject.Dict {
    /// The members whose keys pass `include`, in order.
    fileprivate func filtering(_ include: (String) -> Bool) -> QObject.Dict {
        QObject.Dict(entries.filter { include($0.key) }.map { ($0.key, $0.value) })
    }
}
