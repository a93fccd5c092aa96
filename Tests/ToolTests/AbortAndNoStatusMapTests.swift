import Foundation
import Testing
import QBlock
import TestSupport

/// Two pieces qemu-img-bitmaps needs besides the NBD client: qemu-io's `abort` (a crash
/// that leaves persistent bitmaps marked in use) and `img map` of a node that reports a
/// run as neither data nor zeros (no zeros, no offset, as qemu-img).
@Suite struct AbortAndNoStatusMapTests {
    @Test(qemuTrait)
    func abortLeavesBitmapsInUseAsQemuIO() throws {
        let dir = TempDir()
        var infos: [String] = []
        for tool in ["io", "qemu-io"] {
            let image = dir.file("\(tool).qcow2")
            try mustRun("qemu-img", "create", "-q", "-f", "qcow2", image, "1M")
            try mustRun("qemu-img", "bitmap", "--add", image, "b0")
            try mustRun("qemu-img", "bitmap", "--add", "--disable", image, "b1")
            let r = try run(tool, "-c", "abort", image)
            #expect(r.status != 0 && r.stdout.isEmpty, "\(tool): \(r)")
            let info = try mustRun("qemu-img", "info", "--output=json", "-U", image).stdout
            infos.append(info.replacingOccurrences(of: image, with: "IMAGE"))
        }
        #expect(infos[0] == infos[1])
        #expect(infos[0].contains("in-use"))
        let help = try run("io", "-c", "help")
        #expect(help.stdout.hasPrefix("abort -- simulate a program crash using abort(3)\n"))
    }

    @Test(qemuTrait, arguments: [#"json:{"driver":"null-co","size":1048576}"#,
                                 #"json:{"driver":"null-co","size":1048576,"read-zeroes":true}"#,
                                 #"json:{"driver":"raw","file":{"driver":"null-co","size":1048576}}"#])
    func mapOfANodeWithoutStatusMatchesQemuImg(name: String) throws {
        for fmt in ["--output=json", "--output=human"] {
            let ours = try run("img", "map", fmt, name)
            let theirs = try run("qemu-img", "map", fmt, name)
            #expect(ours.status == 0 && ours.stdout == theirs.stdout, "\(fmt): \(ours) vs \(theirs)")
        }
    }
}
