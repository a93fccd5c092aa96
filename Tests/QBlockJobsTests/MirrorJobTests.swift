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

/// A source chain in a graph with a backend users write through, and a target image.
struct MirrorSetup {
    let dir: TempDir
    let graph = BlockGraph()
    let source: BlockNode
    let backend: BlockBackend
    let target: BlockNode
    let sourcePath: String
    let targetPath: String
    let model: ByteModel

    /// source: base.raw (8M, data in parts) ← top.qcow2 (some clusters); the target is a
    /// new qcow2 image (with base.raw as backing for sync top/none), or `targetURI` when given.
    static func make(_ label: String, sync: MirrorSync, emptyTop: Bool = false, targetURI: ((TempDir) throws -> String)? = nil) async throws -> MirrorSetup {
        let d = TempDir(label)
        let base = d.file("base.raw"), top = d.file("top.qcow2"), tgt = d.file("target.qcow2")
        try mustRun("qemu-img", "create", "-q", "-f", "raw", base, "8M")
        try mustRun("qemu-io", "-f", "raw", "-c", "write -P 0x41 0 2M", "-c", "write -P 0x42 5M 1M", base)
        try mustRun("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", top)
        if !emptyTop { try mustRun("qemu-io", "-c", "write -P 0x51 1M 2M", "-c", "write -z 6M 64k", top) }
        if sync == .full {
            try mustRun("qemu-img", "create", "-q", "-f", "qcow2", tgt, "8M")
        } else {
            try mustRun("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", tgt)
        }
        let model = ByteModel(try JobFixture.content(top))
        let src = BlockNode(nodeName: "src", driver: try await ImageOpener.open(top))
        let targetDriver: any BlockDriver
        if let targetURI {
            targetDriver = try await ImageOpener.open(try targetURI(d), options: OpenOptions(format: "raw"))
        } else {
            targetDriver = try await ImageOpener.open(tgt, options: OpenOptions(format: "qcow2"))
        }
        let s = MirrorSetup(dir: d, source: src, backend: BlockBackend(name: "disk", node: src),
                            target: BlockNode(nodeName: "tgt", driver: targetDriver), sourcePath: top, targetPath: tgt, model: model)
        try s.graph.add(src)
        try s.graph.add(s.target)
        s.graph.attach(s.backend)
        return s
    }

    func close() async throws {
        try await source.close()
        try await target.close()
    }
}

@Suite(.serialized) struct MirrorJobTests {
    static let modes: [(MirrorSync, MirrorCopyMode)] = MirrorSync.allCases.flatMap { s in MirrorCopyMode.allCases.map { (s, $0) } }

    @Test(arguments: modes)
    func mirrorWithAWriterThenPivot(_ sync: MirrorSync, _ mode: MirrorCopyMode) async throws {
        guard Tools.qemuAvailable else { print(Tools.qemuMissing); return }
        let s = try await MirrorSetup.make("mirror", sync: sync, emptyTop: sync == .none)
        let m = JobManager()
        let events = EventLog(m)
        let mirror = try MirrorJob(source: s.source, target: s.target, graph: s.graph,
                                   options: MirrorOptions(sync: sync, copyMode: mode, targetIsZeroed: true))
        let stop = Flag()
        // Background mode converges when the writer is slower than the copy; write-blocking
        // mode with a writer faster than the (rate-limited) copy.
        let pause: UInt64 = mode == .background ? 5_000_000 : 500_000
        let speed: UInt64 = mode == .background ? 0 : 4 << 20
        let job = try m.start(mirror, options: JobOptions(id: "mirror0", speed: speed))
        // (sync=none copies only what is written once the filter is in place.)
        while s.backend.node === s.source { try await Task.sleep(nanoseconds: 1_000_000) }
        let writer = Task { try await runWriter(s.backend, model: s.model, seed: 11, stop: { stop.isSet }, pause: pause) }
        let watchdog = Task { try await Task.sleep(nanoseconds: 20_000_000_000); print("stuck:", job.blockInfo, mirror.bitmap.dirtyBytes) }
        defer { watchdog.cancel() }
        await job.wait(for: .ready)
        #expect(s.backend.node !== s.source)       // the filter is in place
        try await Task.sleep(nanoseconds: 200_000_000)
        try job.complete()
        await job.wait(for: .null)
        #expect(s.backend.node === s.target)       // pivoted
        try await Task.sleep(nanoseconds: 50_000_000)   // the writer goes on, on the target
        stop.set()
        let writes = try await writer.value
        #expect(writes > 5)
        #expect(events.names.filter { $0.hasPrefix("BLOCK_JOB") } == ["BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED"])
        #expect(events.statuses == ["created", "running", "ready", "waiting", "pending", "concluded", "null"])
        try await s.close()
        #expect(try JobFixture.check(s.targetPath))
        #expect(try JobFixture.same(s.targetPath, s.model.data))
    }

    @Test func cancelAfterReadyLeavesAConsistentCopy() async throws {
        guard Tools.qemuAvailable else { print(Tools.qemuMissing); return }
        let s = try await MirrorSetup.make("mirror", sync: .full)
        let m = JobManager()
        let events = EventLog(m)
        let job = try m.start(try MirrorJob(source: s.source, target: s.target, graph: s.graph), options: JobOptions(id: "m"))
        let stop = Flag()
        let writer = Task { try await runWriter(s.backend, model: s.model, seed: 5, stop: { stop.isSet }) }
        await job.wait(for: .ready)
        try await Task.sleep(nanoseconds: 100_000_000)
        stop.set()
        _ = try await writer.value
        try job.cancel()
        await job.wait(for: .null)
        #expect(s.backend.node === s.source)
        #expect(events.names.contains("BLOCK_JOB_COMPLETED"))
        #expect(!events.names.contains("BLOCK_JOB_CANCELLED"))
        try await s.close()
        #expect(try JobFixture.check(s.targetPath))
        #expect(try JobFixture.same(s.targetPath, s.model.data))
        #expect(try JobFixture.same(s.sourcePath, s.model.data))
    }

    @Test func pauseAccumulatesThenCatchesUp() async throws {
        guard Tools.qemuAvailable else { print(Tools.qemuMissing); return }
        let s = try await MirrorSetup.make("mirror", sync: .full)
        let m = JobManager()
        let mirror = try MirrorJob(source: s.source, target: s.target, graph: s.graph)
        let job = try m.start(mirror, options: JobOptions(id: "m"))
        await job.wait(for: .ready)
        try job.pause()
        await job.wait(for: .standby)
        _ = try await runWriter(s.backend, model: s.model, seed: 9, stop: { false }, maxWrites: 50, pause: 0)
        #expect(mirror.bitmap.dirtyBytes > 0)       // paused: nothing copied
        try job.setSpeed(1 << 30)
        try job.resume()
        while mirror.bitmap.dirtyBytes > 0 { try await Task.sleep(nanoseconds: 5_000_000) }
        try job.complete()
        await job.wait(for: .null)
        try await s.close()
        #expect(try JobFixture.same(s.targetPath, s.model.data))
    }

    @Test func forceCancelReturnsUsersToTheSource() async throws {
        guard Tools.qemuAvailable else { print(Tools.qemuMissing); return }
        let s = try await MirrorSetup.make("mirror", sync: .full)
        let m = JobManager()
        let events = EventLog(m)
        let job = try m.start(try MirrorJob(source: s.source, target: s.target, graph: s.graph),
                              options: JobOptions(id: "m", speed: 256 << 10))
        try await Task.sleep(nanoseconds: 50_000_000)
        #expect(job.status == .running)
        try job.cancel(force: true)
        await job.wait(for: .null)
        #expect(events.names.contains("BLOCK_JOB_CANCELLED"))
        #expect(s.backend.node === s.source)
        try await s.backend.write(at: 0, bytes: [1, 2, 3])
        try await s.close()
        #expect(try JobFixture.check(s.targetPath))
    }

    @Test(arguments: MirrorCopyMode.allCases)
    func mirrorToAnNBDTargetServedByQemuNbd(_ mode: MirrorCopyMode) async throws {
        guard Tools.qemuAvailable, Tools.which("qemu-nbd") != nil else { print(Tools.qemuMissing); return }
        var server: Process?
        let s = try await MirrorSetup.make("mirror-nbd", sync: .full) { d in
            let sock = d.file("nbd.sock")
            let p = Process()
            p.executableURL = URL(fileURLWithPath: Tools.which("qemu-nbd")!)
            p.arguments = ["-k", sock, "-f", "qcow2", "--cache=writeback", d.file("target.qcow2")]
            try p.run()
            server = p
            for _ in 0..<200 where !FileManager.default.fileExists(atPath: sock) { usleep(10_000) }
            return "nbd+unix:///?socket=\(sock)"
        }
        defer { server?.terminate(); server?.waitUntilExit() }
        let m = JobManager()
        let job = try m.start(try MirrorJob(source: s.source, target: s.target, graph: s.graph,
                                            options: MirrorOptions(copyMode: mode)), options: JobOptions(id: "m"))
        let stop = Flag()
        let writer = Task { try await runWriter(s.backend, model: s.model, seed: 21, stop: { stop.isSet }) }
        await job.wait(for: .ready)
        try await Task.sleep(nanoseconds: 100_000_000)
        try job.complete()
        await job.wait(for: .null)
        stop.set()
        _ = try await writer.value
        #expect(s.backend.node === s.target)
        try await s.close()
        server?.terminate()
        server?.waitUntilExit()
        #expect(try JobFixture.check(s.targetPath))
        #expect(try JobFixture.same(s.targetPath, s.model.data))
    }

    @Test func targetENOSPCStopsThenResumes() async throws {
        guard Tools.qemuAvailable else { print(Tools.qemuMissing); return }
        let s = try await MirrorSetup.make("mirror-enospc", sync: .full)
        let m = JobManager()
        let events = EventLog(m)
        let options = MirrorOptions(onSourceError: .report, onTargetError: .enospc)
        // Writes to the target fail until "space is freed", when the hook is removed.
        let job = try await Syscalls.withInjector(path: s.targetPath, { call, _ in call == .pwrite ? ENOSPC : nil }) {
            let job = try m.start(try MirrorJob(source: s.source, target: s.target, graph: s.graph, options: options),
                                  options: JobOptions(id: "m"))
            await job.wait(for: .paused)
            #expect(job.blockInfo.ioStatus == .nospace)
            let e = try #require(events.first("BLOCK_JOB_ERROR"))
            #expect(e.data["operation"] == .string("write"))
            #expect(e.data["action"] == .string("stop"))
            // Writers go on meanwhile; their areas wait in the bitmap.
            _ = try await runWriter(s.backend, model: s.model, seed: 4, stop: { false }, maxWrites: 20, pause: 0)
            return job
        }
        try job.resume()
        #expect(job.blockInfo.ioStatus == .ok)
        await job.wait(for: .ready)
        try job.complete()
        await job.wait(for: .null)
        #expect(events.first("BLOCK_JOB_COMPLETED")?.data["error"] == nil)
        #expect(s.backend.node === s.target)
        try await s.close()
        // The clusters allocated for the writes that failed were given back (as QEMU's
        // qcow2_alloc_cluster_abort does): no leaks.
        let check = try run("qemu-img", "check", s.targetPath)
        #expect(check.status == 0, "\(check)")
        #expect(try JobFixture.same(s.targetPath, s.model.data))
    }
}
