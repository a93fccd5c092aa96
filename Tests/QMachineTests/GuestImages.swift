import Foundation
import TestSupport

struct GuestBuildFailed: Error, CustomStringConvertible {
    let script: String
    let result: RunResult
    var description: String { "\(script) failed: \(result)" }
}

/// The Debian riscv64 kernel and an initramfs for the boot tests, built (or found cached) by
/// a script of the repository that prints `KERNEL=` and `INITRD=` lines and exits 2 when the
/// guest cannot be downloaded.
struct GuestImages {
    static let repo = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path

    var kernel: String
    var initrd: String

    /// Runs `script` (relative to the repository) with `arguments`; nil, after saying why
    /// under `suite`'s name, when the guest cannot be downloaded.
    static func build(_ script: String, _ arguments: [String] = [], suite: String) throws -> GuestImages? {
        let r = try run("/bin/bash", ["\(repo)/\(script)"] + arguments)
        if r.status == 2 {
            print("\(suite) skipped: the Debian riscv64 guest cannot be downloaded (\(r.stderr.trimmingCharacters(in: .whitespacesAndNewlines)))")
            return nil
        }
        guard r.status == 0 else { throw GuestBuildFailed(script: script, result: r) }
        var k: String?, i: String?
        for line in r.stdout.split(separator: "\n") {
            if line.hasPrefix("KERNEL=") { k = String(line.dropFirst(7)) }
            if line.hasPrefix("INITRD=") { i = String(line.dropFirst(7)) }
        }
        guard let k, let i else { throw GuestBuildFailed(script: script, result: r) }
        return GuestImages(kernel: k, initrd: i)
    }
}
