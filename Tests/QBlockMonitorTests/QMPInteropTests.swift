import Foundation
import Testing
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
import TestSupport

/// The same QMP script replayed on `nbd --qmp` and on qemu-storage-daemon 7.2: every reply
/// (successes, errors, `query-named-block-nodes` after a live snapshot, the overlay going
/// away with its export) must be byte for byte the same.
@Suite(.serialized, .enabled(if: QMPHarness.ready && Tools.which("qemu-storage-daemon") != nil,
                             Comment(rawValue: "needs qemu-storage-daemon, python3 and the built nbd tool; skipped")))
struct QMPInteropTests {

    @Test func blockCommandsMatchQemuStorageDaemon() throws {
        let ours = try QMPHarness.transcript(daemon: [Tools.executable("nbd") ?? "nbd", "--qmp", "$SOCK"], script: "transcript-block.jsonl")
        let qemu = try QMPHarness.transcript(daemon: [Tools.which("qemu-storage-daemon") ?? "qemu-storage-daemon",
                                           "--chardev", "socket,path=$SOCK,server=on,wait=off,id=m0", "--monitor", "chardev=m0"],
                                  script: "transcript-block.jsonl")
        let a = ours.split(separator: "\n"), b = qemu.split(separator: "\n")
        #expect(a.count == b.count)
        for (i, (x, y)) in zip(a, b).enumerated() {
            #expect(x == y, "reply \(i + 1) differs:\nours: \(x)\nqemu: \(y)")
        }
    }
}
