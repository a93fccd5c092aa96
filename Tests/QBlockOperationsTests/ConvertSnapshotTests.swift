import Foundation
import Testing
import TestSupport
import QBlock
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

/// `img convert -l` copies an internal snapshot, byte for byte what `qemu-img convert -l` copies.
@Suite(.enabled(if: haveQemuImg, "qemu-img is not installed; `make test` installs qemu-utils"))
struct ConvertSnapshotTests {
    @Test(arguments: ["one", "snapshot.name=one", "snapshot.id=1", "1"])
    func convertsASnapshot(spec: String) throws {
        let dir = try tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let src = dir + "/s.qcow2"
        try sh(["qemu-img", "create", "-q", "-f", "qcow2", src, "4M"])
        try sh(["qemu-io", "-c", "write -P 1 0 1M", src])
        try sh(["qemu-img", "snapshot", "-c", "one", src])
        try sh(["qemu-io", "-c", "write -P 2 0 2M", src])
        let ours = try run("img", ["convert", "-l", spec, "-O", "raw", src, dir + "/ours.raw"])
        #expect(ours.status == 0, "\(ours)")
        try sh(["qemu-img", "convert", "-l", spec, "-O", "raw", src, dir + "/theirs.raw"])
        let a = FileManager.default.contents(atPath: dir + "/ours.raw")
        let b = FileManager.default.contents(atPath: dir + "/theirs.raw")
        #expect(a != nil && a == b)
    }

    @Test func absentSnapshotIsAClearError() throws {
        let dir = try tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let src = dir + "/s.qcow2"
        try sh(["qemu-img", "create", "-q", "-f", "qcow2", src, "4M"])
        let r = try run("img", ["convert", "-l", "nope", "-O", "raw", src, dir + "/o.raw"])
        #expect(r.status == 1)
        #expect(r.stderr == "img: Failed to load snapshot: Can't find snapshot\n")
    }
}
