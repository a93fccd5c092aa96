import Foundation
import Glibc
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

@Suite(.serialized) struct StreamJobTests {
    @Test func streamWholeChain() async throws {
        guard Tools.qemuAvailable else { print(Tools.qemuMissing); return }
        let d = TempDir("stream")
        let (_, _, top) = try JobFixture.chain(d)
        let expected = try JobFixture.content(top)
        let node = try #require(try await ImageOpener.open(top) as? Qcow2Node)
        let m = JobManager()
        let events = EventLog(m)
        let job = try m.start(try StreamJob(top: node), options: JobOptions(id: "stream0"))
        await job.wait(for: .null)
        #expect(node.backing == nil)
        try await node.close()
        #expect(events.names.contains("BLOCK_JOB_COMPLETED"))
        #expect(events.first("BLOCK_JOB_COMPLETED")?.data["error"] == nil)
        #expect(try JobFixture.backing(top) == nil)
        #expect(try JobFixture.check(top))
        #expect(try JobFixture.same(top, expected))
    }

    @Test func streamDownToBase() async throws {
        guard Tools.qemuAvailable else { print(Tools.qemuMissing); return }
        let d = TempDir("stream")
        let (base, _, top) = try JobFixture.chain(d)
        let expected = try JobFixture.content(top)
        let node = try #require(try await ImageOpener.open(top) as? Qcow2Node)
        let baseNode = try #require(node.backingChain.last)
        let m = JobManager()
        let job = try m.start(try StreamJob(top: node, base: baseNode), options: JobOptions(id: "s"))
        await job.wait(for: .null)
        #expect(node.backing === baseNode)
        try await node.close()
        #expect(try JobFixture.backing(top) == base)
        #expect(try JobFixture.check(top))
        #expect(try JobFixture.same(top, expected))
        // Only mid's data was copied: base's own clusters past mid's stay unallocated in top.
        let map = try mustRun("qemu-img", "map", "--output=json", top).stdout
        #expect(map.contains("\"start\": 3145728, \"length\": 1048576, \"depth\": 1"))
    }

    @Test func writerThroughTheFilterDuringAStream() async throws {
        guard Tools.qemuAvailable else { print(Tools.qemuMissing); return }
        let d = TempDir("stream")
        let (_, _, top) = try JobFixture.chain(d)
        let model = ByteModel(try JobFixture.content(top))
        let node = try #require(try await ImageOpener.open(top) as? Qcow2Node)
        let stream = try StreamJob(top: node)
        let m = JobManager()
        // 2 MB/s: the 4 MiB stream lasts about two seconds while the writer runs.
        let job = try m.start(stream, options: JobOptions(id: "s", speed: 2 << 20))
        let stop = Flag()
        async let writes = runWriter(stream.filter, model: model, seed: 7, stop: { stop.isSet })
        // Readers through the filter copy on read too.
        var buf = [UInt8](repeating: 0, count: 65536)
        for i in 0..<20 {
            buf = try await stream.filter.read(at: Int64(i) * 196_608 % (4 << 20 - 65536), count: 65536)
        }
        _ = buf
        await job.wait(for: .null)
        stop.set()
        let n = try await writes
        #expect(n > 10)
        try await node.close()
        #expect(try JobFixture.backing(top) == nil)
        #expect(try JobFixture.check(top))
        #expect(try JobFixture.same(top, model.data))
    }

    @Test func enospcStopsAndResumes() async throws {
        guard Tools.qemuAvailable else { print(Tools.qemuMissing); return }
        let d = TempDir("stream")
        let (_, _, top) = try JobFixture.chain(d)
        let expected = try JobFixture.content(top)
        let node = try #require(try await ImageOpener.open(top) as? Qcow2Node)
        let m = JobManager()
        let events = EventLog(m)
        // Writes to the top image fail until "space is freed", when the hook is removed.
        let job = try await Syscalls.withInjector(path: top, { call, _ in call == .pwrite ? ENOSPC : nil }) {
            let job = try m.start(try StreamJob(top: node, onError: .enospc), options: JobOptions(id: "s"))
            await job.wait(for: .paused)
            return job
        }
        #expect(job.blockInfo.ioStatus == .nospace)
        #expect(events.first("BLOCK_JOB_ERROR")?.data["action"] == .string("stop"))
        try job.resume()
        await job.wait(for: .null)
        #expect(events.first("BLOCK_JOB_COMPLETED")?.data["error"] == nil)
        try await node.close()
        #expect(try JobFixture.check(top))
        #expect(try JobFixture.same(top, expected))
    }
}
