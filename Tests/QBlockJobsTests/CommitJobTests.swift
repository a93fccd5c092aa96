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

@Suite(.serialized) struct CommitJobTests {
    @Test func intermediateCommitIntoRawBaseWithAWriterOnTop() async throws {
        guard Tools.qemuAvailable else { print(Tools.qemuMissing); return }
        let d = TempDir("commit")
        let (base, mid, top) = try JobFixture.chain(d)
        let model = ByteModel(try JobFixture.content(top))
        let midContent = try JobFixture.content(mid)
        let node = try #require(try await ImageOpener.open(top) as? Qcow2Node)
        #expect(node.backing?.isReadOnly == true)
        let m = JobManager()
        let events = EventLog(m)
        let job = try m.start(try CommitJob(overlay: node), options: JobOptions(id: "commit0", speed: 4 << 20))
        let stop = Flag()
        async let writes = runWriter(node, model: model, seed: 3, stop: { stop.isSet })
        await job.wait(for: .null)
        stop.set()
        _ = try await writes
        #expect(events.first("BLOCK_JOB_COMPLETED")?.data["error"] == nil)
        #expect(events.first("BLOCK_JOB_COMPLETED")?.data["type"] == .string("commit"))
        #expect(node.backing?.filename == base)
        #expect(node.backing?.isReadOnly == false)
        try await node.close()
        #expect(try JobFixture.backing(top) == base)
        #expect(try JobFixture.check(top))
        #expect(try JobFixture.same(top, model.data))
        // The base now holds what mid showed.
        #expect(try JobFixture.same(base, midContent))
    }

    @Test func commitIntoQcow2BaseInAGraph() async throws {
        guard Tools.qemuAvailable else { print(Tools.qemuMissing); return }
        let d = TempDir("commit")
        let base = d.file("base.qcow2"), mid = d.file("mid.qcow2"), top = d.file("top.qcow2")
        try mustRun("qemu-img", "create", "-q", "-f", "qcow2", base, "2M")
        try mustRun("qemu-io", "-c", "write -P 1 0 2M", base)
        try mustRun("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", mid)
        try mustRun("qemu-io", "-c", "write -P 2 64k 128k", "-c", "write -z 1M 64k", mid)
        try mustRun("qemu-img", "create", "-q", "-f", "qcow2", "-b", mid, "-F", "qcow2", top)
        try mustRun("qemu-io", "-c", "write -P 3 0 4k", top)
        let expected = try JobFixture.content(top)
        let node = try #require(try await ImageOpener.open(top) as? Qcow2Node)
        let graph = BlockGraph()
        let topNode = BlockNode(nodeName: "top", driver: node)
        try graph.add(topNode)
        let backend = BlockBackend(name: "disk", node: topNode)
        graph.attach(backend)
        let m = JobManager()
        let job = try m.start(try CommitJob(overlay: node, graph: graph), options: JobOptions(id: "c", autoFinalize: false))
        await job.wait(for: .pending)
        #expect(try await backend.read(at: 64 << 10, count: 4) == [2, 2, 2, 2])
        try await job.finalize()
        #expect(job.status == .null)
        try await node.close()
        #expect(try JobFixture.backing(top) == base)
        #expect(try JobFixture.check(top))
        #expect(try JobFixture.check(base))
        #expect(try JobFixture.same(top, expected))
    }

    @Test func cancelLeavesTheChainAsItWas() async throws {
        guard Tools.qemuAvailable else { print(Tools.qemuMissing); return }
        let d = TempDir("commit")
        let (_, mid, top) = try JobFixture.chain(d)
        let expected = try JobFixture.content(top)
        let node = try #require(try await ImageOpener.open(top) as? Qcow2Node)
        let m = JobManager()
        let events = EventLog(m)
        let job = try m.start(try CommitJob(overlay: node), options: JobOptions(id: "c", speed: 64 << 10))
        try job.cancel(force: true)
        await job.wait(for: .null)
        #expect(events.names.contains("BLOCK_JOB_CANCELLED"))
        try await node.close()
        #expect(try JobFixture.backing(top) == mid)
        #expect(try JobFixture.same(top, expected))
    }
}

@Suite(.serialized) struct ActiveCommitTests {
    @Test(arguments: MirrorCopyMode.allCases)
    func activeCommitWithAWriterThenPivotToBase(_ mode: MirrorCopyMode) async throws {
        guard Tools.qemuAvailable else { print(Tools.qemuMissing); return }
        let d = TempDir("active-commit")
        let (base, _, top) = try JobFixture.chain(d)
        let model = ByteModel(try JobFixture.content(top))
        let graph = BlockGraph()
        let topNode = BlockNode(nodeName: "top", driver: try await ImageOpener.open(top))
        try graph.add(topNode)
        let backend = BlockBackend(name: "disk", node: topNode)
        graph.attach(backend)
        let m = JobManager()
        let events = EventLog(m)
        let commit = try await ActiveCommit.make(top: topNode, graph: graph, copyMode: mode)
        let job = try m.start(commit, options: JobOptions(id: "commit0"))
        while backend.node === topNode { try await Task.sleep(nanoseconds: 1_000_000) }
        let stop = Flag()
        let writer = Task { try await runWriter(backend, model: model, seed: 17, stop: { stop.isSet }, pause: 3_000_000) }
        await job.wait(for: .ready)
        try await Task.sleep(nanoseconds: 100_000_000)
        try job.complete()
        await job.wait(for: .null)
        stop.set()
        _ = try await writer.value
        #expect(events.first("BLOCK_JOB_READY")?.data["type"] == .string("commit"))
        #expect(backend.node === commit.targetNode)
        #expect(backend.node.filename == base)
        try await backend.node.close()
        try await topNode.close()
        #expect(try JobFixture.same(base, model.data))
    }
}
