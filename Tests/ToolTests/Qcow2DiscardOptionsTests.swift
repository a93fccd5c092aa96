import Foundation
import Testing

/// qcow2's `pass-discard-request`, `pass-discard-snapshot`, `pass-discard-other` (whether
/// clusters qcow2 frees are discarded in its file too), and the options it cannot honour
/// (`overlap-check` other than none, `cache-clean-interval` other than 0), refused rather
/// than accepted and ignored. Compared with qemu-io on the host file's allocation.
@Suite(.serialized) struct Qcow2DiscardOptionsTests {
    /// The host file's allocated bytes after `commands` (an image with 1 MiB written first).
    static func allocated(_ tool: String, open: String) throws -> (Int, IOToolHarness.Run) {
        let dir = try IOToolHarness.TempDir()
        let img = dir.path + "/x.qcow2"
        _ = try IOToolHarness.run(IOToolHarness.qemuImg!, ["create", "-q", "-f", "qcow2", img, "16M"])
        _ = try IOToolHarness.run(IOToolHarness.qemuIO!, ["-c", "write -q -P 7 0 1M", img])
        let r = try IOToolHarness.run(tool, ["-c", "open -o \(open) \(img)", "-c", "discard -q 0 1M", "-c", "close"])
        let map = try IOToolHarness.run(IOToolHarness.qemuImg!, ["map", "--output=json", "-f", "raw", img])
        // Data bytes of the raw view of the file.
        var data = 0
        if let json = try? JSONSerialization.jsonObject(with: Data(map.stdout.utf8)) as? [[String: Any]] {
            for e in json where (e["data"] as? Bool) == true { data += e["length"] as? Int ?? 0 }
        }
        return (data, r)
    }

    @Test("pass-discard-request decides whether a guest discard punches the file, as qemu-io",
          .enabled(if: IOToolHarness.haveQemu, "needs qemu-io, qemu-img and the built io tool"),
          arguments: ["driver=qcow2,pass-discard-request=on", "driver=qcow2,pass-discard-request=off", "driver=qcow2"])
    func passDiscardRequest(open: String) throws {
        let (qemu, qr) = try Self.allocated(IOToolHarness.qemuIO!, open: open)
        let (ours, or) = try Self.allocated(IOToolHarness.ioBinary!, open: open)
        #expect(qr.status == 0 && or.status == 0, "\(qr) \(or)")
        #expect(ours == qemu, "\(open): the file keeps \(ours) data bytes, QEMU's \(qemu)")
        // Not vacuous: the two modes differ.
        if open.hasSuffix("off") { #expect(ours >= 1 << 20) } else { #expect(ours < 1 << 20) }
    }

    @Test("overlap-check other than none and cache-clean-interval other than 0 are refused, none and 0 taken",
          .enabled(if: IOToolHarness.haveQemu, "needs qemu-io, qemu-img and the built io tool"))
    func unimplementedChecksAreRefused() throws {
        let dir = try IOToolHarness.TempDir()
        let img = dir.path + "/x.qcow2"
        _ = try IOToolHarness.run(IOToolHarness.qemuImg!, ["create", "-q", "-f", "qcow2", img, "16M"])
        for (opts, ok) in [("overlap-check=none", true), ("overlap-check=all", false), ("overlap-check.template=none", true),
                           ("cache-clean-interval=0", true), ("cache-clean-interval=600", false), ("data-file=x", false)] {
            let r = try IOToolHarness.run(IOToolHarness.ioBinary!, ["-c", "open -o driver=qcow2,\(opts) \(img)", "-c", "read -q 0 512"])
            let refused = r.stderr.contains("not implemented")
            #expect(refused != ok, "\(opts): \(r)")
        }
    }
}
