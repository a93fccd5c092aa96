import Foundation
import Testing
import QBlock

/// Runs `img SUBCOMMAND args` and `qemu-img SUBCOMMAND args` in two fresh directories
/// prepared by `setup` and expects the same stdout, stderr and exit status.
public func expectSameAsQemu(_ args: [String], setup: (TempDir) throws -> Void = { _ in },
                      sourceLocation: SourceLocation = #_sourceLocation) throws -> (ours: TempDir, theirs: TempDir) {
    let a = TempDir(), b = TempDir()
    try setup(a)
    try setup(b)
    let ours = try run("img", args, cwd: a.path)
    let theirs = try run("qemu-img", args, cwd: b.path)
    let cmd = args.joined(separator: " ")
    #expect(ours.stdout == theirs.stdout, "stdout of \(cmd)", sourceLocation: sourceLocation)
    #expect(ours.stderr == asImg(theirs.stderr), "stderr of \(cmd)", sourceLocation: sourceLocation)
    #expect(ours.status == theirs.status, "status of \(cmd)", sourceLocation: sourceLocation)
    return (a, b)
}
