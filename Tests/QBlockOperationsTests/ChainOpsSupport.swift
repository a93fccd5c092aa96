import Foundation
import TestSupport

/// Fixtures shared by the compare, rebase, commit, amend and shrink tests.
enum ChainFixture {
    /// base (1M of 9s) ← mid (64k of 7s at 64k) ← top (2M: 3s at 0, 4s at 1536k, zeros at 200k).
    static func chain(_ d: TempDir) throws {
        try mustRun("qemu-img", "create", "-q", "-f", "qcow2", d.file("base.qcow2"), "1M")
        try mustRun("qemu-io", "-c", "write -P 9 0 1M", d.file("base.qcow2"))
        try mustRun("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", d.file("mid.qcow2"))
        try mustRun("qemu-io", "-c", "write -P 7 64k 64k", d.file("mid.qcow2"))
        try mustRun("qemu-img", "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", d.file("top.qcow2"), "2M")
        try mustRun("qemu-io", "-c", "write -P 3 0 4k", "-c", "write -P 4 1536k 4k", "-c", "write -z 200k 64k", d.file("top.qcow2"))
        try mustRun("qemu-img", "create", "-q", "-f", "qcow2", d.file("nb.qcow2"), "1M")
        try mustRun("qemu-io", "-c", "write -P 9 0 300k", d.file("nb.qcow2"))
        try mustRun("qemu-img", "convert", "-O", "raw", d.file("top.qcow2"), d.file("expect.raw"))
    }

    /// The bytes of every file in the directory, to check that a refused command changed nothing.
    static func snapshot(_ d: TempDir) throws -> [String: Data] {
        var out: [String: Data] = [:]
        for f in try FileManager.default.contentsOfDirectory(atPath: d.path) {
            out[f] = try Data(contentsOf: URL(fileURLWithPath: d.file(f)))
        }
        return out
    }

    static func identical(_ a: String, _ b: String) throws -> Bool {
        try run("qemu-img", "compare", "-q", a, b).status == 0
    }

    static func clean(_ path: String) throws -> Bool {
        try run("qemu-img", "check", path).status == 0
    }

    static func info(_ path: String) throws -> String {
        try mustRun("qemu-img", "info", "-U", path).stdout
    }
}

/// `mustRun` with the arguments in an array.
@discardableResult
func mustRunArray(_ tool: String, _ args: [String], cwd: String? = nil) throws -> RunResult {
    let r = try run(tool, args, cwd: cwd)
    if r.status != 0 { throw FixtureFailed(description: ([tool] + args).joined(separator: " ") + " failed: \(r)") }
    return r
}

struct FixtureFailed: Error, CustomStringConvertible { let description: String }
