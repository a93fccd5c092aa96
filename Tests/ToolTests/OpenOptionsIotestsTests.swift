import Foundation
import Testing
import QBlock
import TestSupport

/// qemu-io's `reopen -o` (iotests 133, 039, 171), qcow2's cache options (103), options for
/// an image's own backing file (114): the same command lines through qemu-io and io must
/// print the same (timings and the program name masked), exit the same and leave the same
/// image bytes.
let reopenQcow2Scenarios: [[String]] = [
    // Options that cannot change, named at each level (133).
    ["-c", "reopen -o node-name=foo", "IMG"],
    ["-c", "reopen -o file.node-name=foo", "IMG"],
    ["-c", "reopen -o driver=raw", "IMG"],
    ["-c", "reopen -o file.driver=qcow2", "IMG"],
    ["-c", "reopen -o file.locking=off", "IMG"],
    ["-c", "reopen -o file.aio=native", "IMG"],
    // The top's discard mode: discards dropped, then passed on again.
    ["-c", "write -P 7 0 128k", "-c", "reopen -o discard=ignore", "-c", "discard 0 64k", "-c", "read -P 7 0 64k",
     "-c", "reopen -o discard=unmap", "-c", "discard 64k 64k", "-c", "read -P 0 64k 64k", "-c", "reopen -o discard=bogus", "IMG"],
    ["-c", "reopen -o file.read-only=on", "-c", "write -P 1 0 512", "IMG"],
    ["-c", "reopen -r -o file.read-only=on", "-c", "read -P 0 0 512", "IMG"],
    // Unchanged values are fine.
    ["-c", "open -o node-name=foo IMG", "-c", "reopen -o node-name=foo", "-c", "reopen", "-c", "read -P 0 0 1"],
    ["-c", "open -o file.node-name=foo IMG", "-c", "reopen -o file.node-name=foo", "-c", "reopen"],
    ["-c", "reopen -o driver=qcow2", "-c", "reopen -o file.driver=file", "IMG"],
    // -r/-w/-c against their options, and bad booleans.
    ["-c", "reopen -r -o read-only=on", "IMG"],
    ["-c", "reopen -c none -o cache.direct=on", "IMG"],
    ["-c", "reopen -c directsync -o cache.no-flush=on", "IMG"],
    ["-c", "reopen -o read-only=foo", "IMG"],
    ["-c", "reopen -o cache.no-flush=bar", "IMG"],
    ["-c", "reopen -o auto-read-only=qux", "IMG"],
    // Read-only through the option, then writable again.
    ["-c", "reopen -o read-only=on", "-c", "write 0 1", "-c", "reopen -o read-only=off", "-c", "write -P 3 0 512", "IMG"],
    // qcow2's runtime options.
    ["-c", "reopen -o lazy-refcounts=on", "-c", "write -P 0x5a 0 512", "-c", "reopen -o lazy-refcounts=off", "IMG"],
    ["-c", "reopen -o l2-cache-size=64k,refcount-cache-size=256k", "-c", "write -P 1 0 64k", "-c", "read -P 1 0 64k", "IMG"],
    ["-c", "reopen -o cache-size=1M,l2-cache-size=2M", "IMG"],
    ["-c", "reopen -o l2-cache-entry-size=4242", "IMG"],
    ["-c", "reopen -o lazy-refcounts=maybe", "IMG"],
    // qcow2's cache size checks at open (103).
    ["-c", "open -o cache-size=1.25M,l2-cache-size=1M,refcount-cache-size=0.25M IMG"],
    ["-c", "open -o cache-size=1M,l2-cache-size=2M IMG"],
    ["-c", "open -o cache-size=1M,refcount-cache-size=2M IMG"],
    ["-c", "open -o l2-cache-entry-size=256 IMG"],
    ["-c", "open -o l2-cache-entry-size=128k IMG"],
    ["-c", "open -o cache-size=0 IMG", "-c", "write -P 4 0 64k", "-c", "read -P 4 0 64k"],
    ["-c", "open -o cache-size=2M,refcount-cache-size=1M IMG", "-c", "read -P 0 0 64k"],
    ["-c", "open -o l2-cache-entry-size=16k IMG", "-c", "read -P 0 0 64k"],
    // Backing options for an image without a backing file.
    ["-c", "open -o backing.driver=qcow2 IMG"],
    ["-c", "open -o backing.l2-cache-size=1M IMG"],
    // blkdebug named by its prefixed file name with options for the image below it (177, 204).
    ["-c", "open -o driver=blkdebug,image.driver=qcow2,align=4k,max-transfer=64k blkdebug::IMG",
     "-c", "write -P 33 1000 128k", "-c", "read -P 33 1000 128k"],
    ["-c", "open -o driver=blkdebug,image.driver=qcow2,image.file.driver=file,image.file.filename=IMG", "-c", "read -P 0 0 4k"],
    // max-transfer limits the writes of zeros, not the write-zeroes requests (max-write-zero does).
    ["-c", "open -o driver=blkdebug,image.driver=qcow2,align=512,max-transfer=4k,opt-write-zero=64k blkdebug::IMG",
     "-c", "write -P 1 0 384k", "-c", "write -z 1000 200k", "-c", "read -P 0 1000 200k"],
    ["-c", "open -o driver=blkdebug,image.driver=qcow2,align=512,opt-write-zero=64k,max-write-zero=64k blkdebug::IMG",
     "-c", "write -P 1 0 384k", "-c", "write -z 1000 300k", "-c", "read -P 0 1000 300k"],
    ["-c", "open -o driver=blkdebug,image.driver=qcow2,opt-write-zero=64k,max-write-zero=96k blkdebug::IMG"],
    // Rules given inline: a json: list, dotted list keys, one rule as an object (089, 071);
    // the flush at close has no write to reach the disk for, so the rule does not fail it.
    ["-c", "write -P 42 0 512", "-c", "close", "-c",
     #"open json:{"driver":"qcow2","file":{"driver":"blkdebug","inject-error":[{"event":"l2_load"}],"image.filename":"IMG"}}"#,
     "-c", "read -P 42 0 512"],
    ["-c", "write -P 42 0 512", "-c", "close", "-c",
     "open -o driver=qcow2,file.driver=blkdebug,file.inject-error.0.event=l2_load,file.image.filename=IMG", "-c", "read -P 42 0 512"],
    ["-c", "write -P 42 0 512", "-c", "close", "-c", "open -o file.driver=blkdebug,file.inject-error.event=l2_load IMG",
     "-c", "read -P 42 0 512"],
]

/// raw's window moved by `reopen -o offset=…,size=…` (171), with string numbers in `json:`.
let reopenRawScenarios: [[String]] = [
    ["-c", "write -P 0x0a 0 512", "-c", "reopen -o driver=raw,offset=1536,size=1024", "-c", "write -P 0x0b 0 1024",
     "-c", "write -P 0x0a 1024 1",
     #"json:{"driver":"raw", "offset":"512", "size":"512", "file": {"driver":"file", "filename":"IMG"}}"#],
    ["-c", "reopen -o offset=8192", #"json:{"driver":"raw", "offset":"512", "file": {"driver":"file", "filename":"IMG"}}"#],
    ["-c", "reopen -o size=1000", #"json:{"driver":"raw", "offset":"512", "file": {"driver":"file", "filename":"IMG"}}"#],
    ["-c", "reopen -o size=4096", #"json:{"driver":"raw", "offset":"512", "file": {"driver":"file", "filename":"IMG"}}"#],
    ["-c", "reopen", "-c", "info", #"json:{"driver":"null-co","size":65536}"#],
]

/// `text` with automatic node names ("#block140") masked.
private func maskNodeNames(_ text: String) -> String {
    text.replacing(#/#block[0-9]+/#, with: "#blockN")
}

@Suite("open options and reopen as in QEMU's iotests")
struct OpenOptionsIotestsTests {
    @Test("io matches qemu-io: reopen -o and qcow2 cache options",
          .enabled(if: IOToolHarness.haveQemu, "needs qemu-io, qemu-img and the built io tool"),
          arguments: reopenQcow2Scenarios)
    func qcow2(_ args: [String]) throws {
        let c = try IOToolHarness.compare(args, size: "4M", format: "qcow2", createOptions: ["-o", "compat=1.1"])
        #expect(c.io.stdout == c.qemu.stdout)
        // (Automatic node names end in two random digits.)
        #expect(maskNodeNames(c.io.stderr) == maskNodeNames(c.qemu.stderr))
        #expect(c.io.status == c.qemu.status)
        #expect(c.ioImage == c.qemuImage, "images differ after the same commands")
    }

    @Test("io matches qemu-io: raw windows and reopen",
          .enabled(if: IOToolHarness.haveQemu, "needs qemu-io, qemu-img and the built io tool"),
          arguments: reopenRawScenarios)
    func raw(_ args: [String]) throws {
        let c = try IOToolHarness.compare(args, size: "4k", format: "raw")
        #expect(c.io.stdout == c.qemu.stdout)
        #expect(c.io.stderr == c.qemu.stderr)
        #expect(c.io.status == c.qemu.status)
        #expect(c.ioImage == c.qemuImage, "images differ after the same commands")
    }

    @Test("img map --image-opts with cache.direct=on covers the partial last block (iotest 253)",
          .enabled(if: IOToolHarness.haveQemu && Tools.executable("img") != nil, "needs qemu-img and the built img tool"))
    func directMapOfUnalignedFile() throws {
        let dir = try IOToolHarness.TempDir()
        let img = dir.path + "/t.raw"
        _ = try IOToolHarness.run(IOToolHarness.qemuImg!, ["create", "-q", "-f", "raw", img, "1048575"])
        _ = try IOToolHarness.run(IOToolHarness.qemuIO!, ["-f", "raw", "-c", "write 983040 65535", img])
        for opts in ["driver=raw,file.driver=file,file.filename=\(img),cache.direct=on", "driver=raw,file.filename=\(img)"] {
            let argv = ["map", "--output=json", "--image-opts", opts]
            let q = try IOToolHarness.run(IOToolHarness.qemuImg!, argv)
            let i = try IOToolHarness.run(Tools.executable("img")!, argv)
            #expect(i.stdout == q.stdout, "\(opts)")
            #expect(i.status == q.status)
        }
    }

    @Test("reopen -o lazy-refcounts=on leaves the image dirty after a kill, as QEMU (iotest 039)",
          .enabled(if: IOToolHarness.haveQemu, "needs qemu-io, qemu-img and the built io tool"))
    func lazyRefcountsAtRuntime() throws {
        for (create, reopen) in [("lazy_refcounts=off", "lazy-refcounts=on"), ("lazy_refcounts=on", "lazy-refcounts=off")] {
            var outputs: [String] = []
            for tool in [IOToolHarness.qemuIO!, IOToolHarness.ioBinary!] {
                let dir = try IOToolHarness.TempDir()
                let img = dir.path + "/t.qcow2"
                _ = try IOToolHarness.run(IOToolHarness.qemuImg!, ["create", "-q", "-f", "qcow2", "-o", "compat=1.1,\(create)", img, "128M"])
                _ = try IOToolHarness.run(tool, ["-c", "reopen -o \(reopen)", "-c", "write -P 0x5a 0 512", "-c", "sigraise 9", img])
                let check = try IOToolHarness.run(IOToolHarness.qemuImg!, ["check", img])
                let info = try IOToolHarness.run(IOToolHarness.qemuImg!, ["info", "-U", "--output=json", img])
                let dirty = info.stdout.contains("\"dirty-flag\": true")
                outputs.append("\(check.stdout)|\(check.status)|dirty=\(dirty)")
            }
            #expect(outputs[0] == outputs[1], "\(create) then reopen -o \(reopen)")
        }
    }

    @Test("open -o backing.driver overrides the format the image names for its backing file (iotest 114)",
          .enabled(if: IOToolHarness.haveQemu, "needs qemu-io, qemu-img and the built io tool"))
    func backingDriverOverride() throws {
        let dir = try IOToolHarness.TempDir()
        let base = dir.path + "/b.qcow2", top = dir.path + "/t.qcow2"
        _ = try IOToolHarness.run(IOToolHarness.qemuImg!, ["create", "-q", "-f", "qcow2", base, "1M"])
        _ = try IOToolHarness.run(IOToolHarness.qemuIO!, ["-c", "write -P 0x11 0 64k", base])
        // A backing format no driver has: only the override opens it.
        _ = try IOToolHarness.run(IOToolHarness.qemuImg!, ["create", "-q", "-f", "qcow2", "-u", "-b", base, "-F", "raw", top])
        for args in [["-c", "open -o backing.driver=qcow2 \(top)", "-c", "read -P 0x11 0 64k"],
                     ["-c", "open -o backing.driver=qcow2,backing.l2-cache-size=64k \(top)", "-c", "read -P 0x11 0 4k"],
                     ["-c", "open -o backing.driver=file \(top)", "-c", "read -P 0 0 1"]] {
            let q = try IOToolHarness.run(IOToolHarness.qemuIO!, args)
            let i = try IOToolHarness.run(IOToolHarness.ioBinary!, args)
            #expect(IOToolHarness.mask(i.stdout, image: top, program: "io") == IOToolHarness.mask(q.stdout, image: top, program: "qemu-io"))
            #expect(IOToolHarness.mask(i.stderr, image: top, program: "io") == IOToolHarness.mask(q.stderr, image: top, program: "qemu-io"))
            #expect(i.status == q.status)
        }
    }
}
