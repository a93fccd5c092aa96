import Foundation
import Glibc
import Testing
import TestSupport
import QBlock   // deliberately not @testable: these tests use the public library API only

/// Every write a test writer made, in order, so that a test can rebuild the disk as it was
/// after any number of them (a live snapshot must capture one of those states exactly).
final class WriteLog: @unchecked Sendable {
    // @unchecked: `writes` is only touched with `lock` held.
    private let lock = PosixMutex()
    let initial: [UInt8]
    private var writes: [(offset: Int, bytes: [UInt8])] = []
    init(_ initial: [UInt8]) { self.initial = initial }

    func append(_ offset: Int64, _ bytes: [UInt8]) { lock.withLock { writes.append((Int(offset), bytes)) } }
    var count: Int { lock.withLock { writes.count } }

    /// The disk after the first `n` writes.
    func state(after n: Int) -> [UInt8] {
        var d = initial
        for w in lock.withLock({ writes.prefix(n) }) { d.replaceSubrange(w.offset..<w.offset + w.bytes.count, with: w.bytes) }
        return d
    }
    /// The disk after every write.
    var current: [UInt8] { state(after: count) }

    /// Whether `bytes` is the disk after some number of writes in `range`.
    func isState(_ bytes: [UInt8], afterSomeOf range: ClosedRange<Int>) -> Bool {
        let all = lock.withLock { writes }
        var d = initial
        for (i, w) in all.enumerated() {
            if range.contains(i) && d == bytes { return true }
            d.replaceSubrange(w.offset..<w.offset + w.bytes.count, with: w.bytes)
        }
        return range.contains(all.count) && d == bytes
    }
}

/// Writes random 4k..64k blocks through `image` until `stop` is set (one write at a time).
func apiWriter(_ image: Image, log: WriteLog, seed: UInt64, stop: Flag, pause: UInt64 = 2_000_000) async throws -> Int {
    var rng = SplitMix(seed: seed)
    let size = image.size
    var n = 0
    while !stop.isSet {
        let len = Int64(4096 * (1 + Int(rng.next() % 16)))
        let off = Int64(rng.next() % UInt64((size - len) / 4096)) * 4096
        let data = [UInt8](repeating: UInt8(truncatingIfNeeded: rng.next() | 1), count: Int(len))
        try await image.write(data, at: off)
        log.append(off, data)
        n += 1
        if pause > 0 { try? await Task.sleep(nanoseconds: pause) }
    }
    return n
}

/// Expects `body` to throw a ``BlockError`` with `code`.
func expectBlockError<R>(_ code: BlockError.Code, sourceLocation: SourceLocation = #_sourceLocation,
                         _ body: () async throws -> R) async {
    do {
        _ = try await body()
        Issue.record("expected a \(code) error", sourceLocation: sourceLocation)
    } catch let error as BlockError {
        #expect(error.code == code, "\(error.message)", sourceLocation: sourceLocation)
    } catch {
        Issue.record("expected a BlockError, got \(error)", sourceLocation: sourceLocation)
    }
}

/// base.raw (0x11 in [0,1M), 0x12 in [3M,4M)) ← mid.qcow2 (0x22 in [512k,1.5M)) ← top.qcow2
/// (0x33 in [1M,1M+64k)), 4 MiB, made through the library API; returns the paths.
func apiChain(_ d: TempDir) async throws -> (base: String, mid: String, top: String) {
    let base = d.file("base.raw"), mid = d.file("mid.qcow2"), top = d.file("top.qcow2")
    try await Image.create(base, format: .raw, size: 4 << 20)
    try await Image.withOpened(base, format: .raw) { img in
        try await img.write([UInt8](repeating: 0x11, count: 1 << 20), at: 0)
        try await img.write([UInt8](repeating: 0x12, count: 1 << 20), at: 3 << 20)
    }
    try await Image.create(mid, format: .qcow2, size: 4 << 20, backing: BackingImage(base, format: .raw))
    try await Image.withOpened(mid, format: .qcow2) { img in
        try await img.write([UInt8](repeating: 0x22, count: 1 << 20), at: 512 << 10)
    }
    try await Image.create(top, format: .qcow2, size: 4 << 20, backing: BackingImage(mid, format: .qcow2))
    try await Image.withOpened(top, format: .qcow2) { img in
        try await img.write([UInt8](repeating: 0x33, count: 64 << 10), at: 1 << 20)
    }
    return (base, mid, top)
}

/// The whole guest content of the image at `path`, read through the library.
func apiContent(_ path: String) async throws -> [UInt8] {
    try await Image.withOpened(path, mode: .readOnly) { try await $0.read(at: 0, count: Int($0.size)) }
}

@Suite(.serialized) struct LibraryAPITests {
    @Test func createChainReadWriteAndConvert() async throws {
        let d = TempDir("api-chain")
        let base = d.file("base.raw"), top = d.file("top.qcow2"), flat = d.file("flat.qcow2")
        try await Image.create(base, format: .raw, size: 4 << 20)
        try await Image.withOpened(base, format: .raw) { img in
            #expect(img.size == 4 << 20)
            try await img.write([UInt8](repeating: 0x11, count: 1 << 20), at: 0)
            try await img.flush()
        }
        try await Image.create(top, format: .qcow2, size: 4 << 20, backing: BackingImage(base, format: .raw),
                               options: ImageCreateOptions(clusterSize: 65536))
        let pattern = (0..<8192).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 1) }
        var escaped: Image?
        try await Image.withOpened(top, format: .probe, mode: .readWrite) { img in
            escaped = img
            let info = try img.info
            #expect(info.format == .qcow2)
            #expect(info.virtualSize == 4 << 20)
            #expect(info.top.path == top)
            #expect(info.top.clusterSize == 65536)
            #expect(info.top.backingFileName == base)
            #expect(info.backingChain.map(\.path) == [base])
            #expect(info.backingChain.map(\.format) == [.raw])
            #expect(info.backingChain.first?.isReadOnly == true)
            // Unallocated in the top: read from the backing file.
            #expect(try await img.read(at: 4096, count: 4) == [0x11, 0x11, 0x11, 0x11])
            // Spans, both ways, without copies.
            try await img.write(pattern.span.bytes, at: 1 << 20)
            var back = [UInt8](repeating: 0, count: pattern.count)
            do {
                var span = back.mutableSpan
                var raw = span.mutableBytes
                try await img.read(at: 1 << 20, into: &raw)
            }
            #expect(back == pattern)
            var again = [UInt8](repeating: 0, count: 100)
            try await img.read(at: (1 << 20) + 100, into: &again)
            #expect(again == Array(pattern[100..<200]))
            try await img.writeZeroes(at: 0, count: 65536)
            #expect(try await img.read(at: 0, count: 16) == [UInt8](repeating: 0, count: 16))
            await expectBlockError(.outOfRange) { try await img.read(at: (4 << 20) - 10, count: 20) }
            await expectBlockError(.outOfRange) { try await img.write([1], at: 4 << 20) }
            try await img.flush()
        }
        // The scope closed the image: later calls fail with one error.
        let closed = try #require(escaped)
        #expect(closed.isClosed)
        await expectBlockError(.closed) { try await closed.read(at: 0, count: 1) }
        await expectBlockError(.closed) { try closed.info }
        try await Image.withOpened(top, mode: .readOnly) { img in
            #expect(img.isReadOnly)
            await expectBlockError(.readOnly) { try await img.write([1], at: 0) }
        }
        await expectBlockError(.invalidArgument) { try await Image.create(d.file("x.raw"), format: .raw, size: -1) }
        await expectBlockError(.invalidArgument) {
            try await Image.create(d.file("y.raw"), format: .raw, size: 1 << 20, backing: BackingImage(base, format: .raw))
        }
        // A closure's error passes through, and the image is closed anyway.
        struct Stop: Error {}
        await #expect(throws: Stop.self) { try await Image.withOpened(top) { _ in throw Stop() } }

        try await Image.convert(top, to: flat, format: .qcow2)
        let expected = try await apiContent(top)
        #expect(try await apiContent(flat) == expected)
        let flatChain = try await Image.withOpened(flat) { try $0.info.backingChain }
        #expect(flatChain.isEmpty)

        guard Tools.qemuAvailable else { print(Tools.qemuMissing); return }
        let chain = try mustRun("qemu-img", "info", "--backing-chain", top).stdout
        #expect(chain.contains("image: \(top)") && chain.contains("image: \(base)"))
        #expect(try JobFixture.check(top))
        #expect(try JobFixture.check(flat))
        #expect(try JobFixture.same(top, Data(expected)))
        #expect(try JobFixture.same(flat, Data(expected)))
    }

    @Test func liveSnapshotWhileWriting() async throws {
        let d = TempDir("api-snap")
        let disk = d.file("disk.qcow2"), snap = d.file("snap.qcow2")
        try await Image.create(disk, format: .qcow2, size: 8 << 20)
        try await Image.withOpened(disk) { try await $0.write([UInt8](repeating: 0x41, count: 2 << 20), at: 1 << 20) }
        let log = WriteLog(try await apiContent(disk))
        var range = 0...0
        try await LiveDisk.withOpened(disk, format: .qcow2) { live in
            let stop = Flag()
            let writer = Task { try await apiWriter(live.active, log: log, seed: 7, stop: stop) }
            while log.count < 20 { try await Task.sleep(nanoseconds: 1_000_000) }
            let before = log.count
            let layer = try await live.snapshot(to: snap)
            #expect(layer.path == snap)
            #expect(layer.backingFileName == disk)
            while log.count < before + 40 { try await Task.sleep(nanoseconds: 1_000_000) }
            stop.set()
            _ = try await writer.value
            range = before...log.count
            let info = try live.info
            #expect(info.layers.map(\.path) == [snap, disk])
            #expect(info.layers.map(\.isReadOnly) == [false, true])    // the old top is read-only now
            #expect(try await live.active.read(at: 0, count: 8 << 20) == log.current)
            // A snapshot onto an existing file is refused, leaving the disk as it was.
            await expectBlockError(.invalidArgument) { try await live.snapshot(to: snap) }
            #expect(try live.info.layers.count == 2)
        }
        // The old top holds the disk exactly as some prefix of the writes left it.
        #expect(log.isState(try await apiContent(disk), afterSomeOf: range))
        #expect(try await apiContent(snap) == log.current)

        guard Tools.qemuAvailable else { print(Tools.qemuMissing); return }
        let chain = try mustRun("qemu-img", "info", "--backing-chain", snap).stdout
        #expect(chain.contains("image: \(snap)") && chain.contains("image: \(disk)"))
        #expect(try JobFixture.backing(snap) == disk)
        #expect(try JobFixture.check(snap))
        #expect(try JobFixture.check(disk))
        #expect(try JobFixture.same(snap, Data(log.current)))
    }

    static let mirrorModes: [(MirrorSync, MirrorCopyMode)] = [(.full, .background), (.top, .writeBlocking), (.none, .background)]

    @Test(arguments: mirrorModes)
    func mirrorWhileWritingThenSwitch(_ sync: MirrorSync, _ mode: MirrorCopyMode) async throws {
        let d = TempDir("api-mirror")
        let base = d.file("base.raw"), disk = d.file("disk.qcow2"), target = d.file("target.qcow2")
        try await Image.create(base, format: .raw, size: 8 << 20)
        try await Image.withOpened(base, format: .raw) { img in
            try await img.write([UInt8](repeating: 0x41, count: 2 << 20), at: 0)
            try await img.write([UInt8](repeating: 0x42, count: 1 << 20), at: 5 << 20)
        }
        try await Image.create(disk, format: .qcow2, size: 8 << 20, backing: BackingImage(base, format: .raw))
        try await Image.withOpened(disk) { try await $0.write([UInt8](repeating: 0x51, count: 2 << 20), at: 1 << 20) }
        let log = WriteLog(try await apiContent(disk))
        try await LiveDisk.withOpened(disk) { live in
            let stop = Flag()
            let pause: UInt64 = mode == .background ? 5_000_000 : 1_000_000
            let writer = Task { try await apiWriter(live.active, log: log, seed: 11, stop: stop, pause: pause) }
            let mirror = try await live.mirror(to: target, sync: sync, mode: mode)
            #expect(mirror.kind == .mirror && mirror.hasReadyPhase)
            await expectBlockError(.busy) { try await live.snapshot(to: d.file("other.qcow2")) }
            try await mirror.ready()
            #expect(mirror.progress.total > 0 || sync == .none)
            try await Task.sleep(nanoseconds: 100_000_000)
            try mirror.complete()
            try await mirror.finished()
            stop.set()
            _ = try await writer.value
            let info = try live.info
            #expect(info.top.path == target)
            switch sync {
            case .full: #expect(info.layers.map(\.path) == [target])
            case .top: #expect(info.layers.map(\.path) == [target, base])
            case .none: #expect(info.layers.map(\.path) == [target, disk, base])
            }
            #expect(try await live.active.read(at: 0, count: 8 << 20) == log.current)
            var seen: [String] = []
            for await e in mirror.events { seen.append(e.description) }
            #expect(seen.contains("ready") && seen.last == "status(null)")
        }
        #expect(try await apiContent(target) == log.current)
        guard Tools.qemuAvailable else { print(Tools.qemuMissing); return }
        #expect(try JobFixture.check(target))
        #expect(try JobFixture.same(target, Data(log.current)))
        #expect(try JobFixture.backing(target) == (sync == .full ? nil : sync == .top ? base : disk))
    }

    @Test func mirrorEventsInOrderAndReplayed() async throws {
        let d = TempDir("api-events")
        let disk = d.file("disk.qcow2"), target = d.file("copy.raw")
        try await Image.create(disk, format: .qcow2, size: 2 << 20)
        try await Image.withOpened(disk) { try await $0.write([UInt8](repeating: 0x61, count: 1 << 20), at: 0) }
        try await LiveDisk.withOpened(disk) { live in
            let mirror = try await live.mirror(to: target, format: .raw)
            let reader = Task { var all: [String] = []; for await e in mirror.events { all.append(e.description) }; return all }
            try await mirror.ready()
            #expect(mirror.status == .ready)
            try mirror.pause()
            try mirror.resume()
            try mirror.complete()
            try await mirror.finished()
            let seen = await reader.value
            let expected = ["status(created)", "status(running)", "status(ready)", "ready",
                            "status(waiting)", "status(pending)", "completed", "status(concluded)", "status(null)"]
            // A pause of a ready job passes through standby; nothing else comes between.
            #expect(seen.filter { $0 != "status(standby)" && $0 != "status(ready)" } == expected.filter { $0 != "status(ready)" })
            #expect(seen.prefix(4) == expected.prefix(4))
            // A second iteration replays everything from the start.
            var again: [String] = []
            for await e in mirror.events { again.append(e.description) }
            #expect(again == seen)
            #expect(try live.info.layers.map(\.path) == [target])
            await expectBlockError(.invalidArgument) { try mirror.complete() }
        }
        #expect(try await apiContent(target) == [UInt8](repeating: 0x61, count: 1 << 20) + [UInt8](repeating: 0, count: 1 << 20))
    }

    @Test func readyThrowsWhenTheJobIsCancelledFirst() async throws {
        let d = TempDir("api-cancel")
        let disk = d.file("disk.qcow2"), target = d.file("copy.qcow2")
        try await Image.create(disk, format: .qcow2, size: 64 << 20)
        try await Image.withOpened(disk) { try await $0.write([UInt8](repeating: 0x61, count: 8 << 20), at: 0) }
        try await LiveDisk.withOpened(disk) { live in
            let mirror = try await live.mirror(to: target)
            try mirror.setSpeed(bytesPerSecond: 1 << 20)
            try mirror.cancel()
            await expectBlockError(.cancelled) { try await mirror.ready() }
            await expectBlockError(.cancelled) { try await mirror.finished() }
            #expect(mirror.failure?.code == .cancelled)
            var seen: [String] = []
            for await e in mirror.events { seen.append(e.description) }
            #expect(!seen.contains("ready"))
            #expect(Array(seen.suffix(4)) == ["status(aborting)", "cancelled", "status(concluded)", "status(null)"])
            // The disk stays on its image, and can start another job.
            #expect(try live.info.layers.map(\.path) == [disk])
            await expectBlockError(.invalidArgument) { try await live.commit() }   // no backing image
            let again = try await live.mirror(to: d.file("copy2.qcow2"))
            try again.cancel()
            await expectBlockError(.cancelled) { try await again.finished() }
        }
    }

    @Test func readyThrowsTheErrorOfAJobThatFailsFirst() async throws {
        let d = TempDir("api-fail")
        let base = d.file("base.raw"), top = d.file("top.qcow2"), target = d.file("copy.qcow2"), sock = d.file("nbd.sock")
        try await Image.create(base, format: .raw, size: 4 << 20)
        try await Image.withOpened(base, format: .raw) { try await $0.write([UInt8](repeating: 0x71, count: 4 << 20), at: 0) }
        // The backing image is served over NBD; the server goes away before the mirror starts,
        // so the mirror's first read of the source fails.
        let (stopStream, stop) = AsyncStream<Void>.makeStream()
        let (uriStream, uriOut) = AsyncStream<NBDURI>.makeStream()
        let server = Task {
            try await Image.withOpened(base, format: .raw, mode: .readOnly) { img in
                try await img.withNBDExport(name: "base", at: .unix(path: sock), readOnly: true) { uri in
                    uriOut.yield(uri)
                    for await _ in stopStream {}
                }
            }
        }
        var uris = uriStream.makeAsyncIterator()
        let uri = try #require(await uris.next())
        try await Image.create(top, format: .qcow2, size: 4 << 20, backing: BackingImage(uri.text, format: .raw))
        var bodyDone = false
        do {
            try await LiveDisk.withOpened(top) { live in
                #expect(try await live.active.read(at: 0, count: 2) == [0x71, 0x71])
                stop.finish()
                try await server.value
                let mirror = try await live.mirror(to: target)
                var readyError: BlockError?
                do throws(BlockError) { try await mirror.ready() } catch { readyError = error }
                let e = try #require(readyError)
                #expect(e.code != .cancelled)
                await expectBlockError(e.code) { try await mirror.finished() }
                #expect(mirror.failure?.message == e.message)
                var seen: [BlockJobEvent] = []
                for await ev in mirror.events { seen.append(ev) }
                #expect(!seen.contains { if case .ready = $0 { return true } else { return false } })
                let completed = seen.compactMap { ev -> BlockError?? in if case .completed(let err) = ev { return err } else { return nil } }
                #expect(completed.count == 1 && completed[0]?.message == e.message)
                #expect(seen.map(\.description).suffix(2) == ["status(concluded)", "status(null)"])
                #expect(try live.info.top.path == top)
                bodyDone = true
            }
        } catch {
            // Closing a chain whose NBD backing file is gone may report that; the body ran.
            print("close after the NBD server left: \(error)")
        }
        #expect(bodyDone)
    }

    @Test func streamWhileWriting() async throws {
        let d = TempDir("api-stream")
        let (base, mid, top) = try await apiChain(d)
        let log = WriteLog(try await apiContent(top))
        try await LiveDisk.withOpened(top) { live in
            let stop = Flag()
            let writer = Task { try await apiWriter(live.active, log: log, seed: 3, stop: stop, pause: 3_000_000) }
            let stream = try await live.stream(base: base)
            #expect(!stream.hasReadyPhase)
            await expectBlockError(.unsupported) { try await stream.ready() }
            try await stream.finished()
            stop.set()
            _ = try await writer.value
            #expect(try live.info.layers.map(\.path) == [top, base])
            #expect(try live.info.top.backingFileName == base)
            #expect(try await live.active.read(at: 0, count: 4 << 20) == log.current)
            await expectBlockError(.notFound) { try await live.stream(base: mid) }
        }
        #expect(try await apiContent(top) == log.current)
        guard Tools.qemuAvailable else { print(Tools.qemuMissing); return }
        #expect(try JobFixture.check(top))
        #expect(try JobFixture.backing(top) == base)
        #expect(try JobFixture.same(top, Data(log.current)))
    }

    @Test func commitIntermediateAndActive() async throws {
        let d = TempDir("api-commit")
        let (base, mid, top) = try await apiChain(d)
        let expected = try await apiContent(top)
        try await LiveDisk.withOpened(top) { live in
            // The middle image into the base: no ready phase.
            let c1 = try await live.commit(top: mid, base: base)
            #expect(!c1.hasReadyPhase && c1.kind == .commit)
            try await c1.finished()
            let info = try live.info
            #expect(info.layers.map(\.path) == [top, base])
            #expect(info.layers.map(\.isReadOnly) == [false, true])
            #expect(try await live.active.read(at: 0, count: 4 << 20) == expected)
            // The active image into the base: ready, then the disk switches to the base.
            try await live.active.write([UInt8](repeating: 0x44, count: 4096), at: 8192)
            let c2 = try await live.commit()
            #expect(c2.hasReadyPhase)
            try await c2.ready()
            try c2.complete()
            try await c2.finished()
            #expect(try live.info.layers.map(\.path) == [base])
            var now = expected
            now.replaceSubrange(8192..<12288, with: [UInt8](repeating: 0x44, count: 4096))
            #expect(try await live.active.read(at: 0, count: 4 << 20) == now)
        }
        var now = expected
        now.replaceSubrange(8192..<12288, with: [UInt8](repeating: 0x44, count: 4096))
        #expect(try await apiContent(base) == now)
        guard Tools.qemuAvailable else { print(Tools.qemuMissing); return }
        #expect(try JobFixture.backing(top) == base)
        #expect(try JobFixture.check(top))
        #expect(try JobFixture.same(base, Data(now)))
    }

    @Test(arguments: [false, true])
    func nbdRoundTrip(overTCP: Bool) async throws {
        let d = TempDir("api-nbd")
        let disk = d.file("disk.qcow2")
        try await Image.create(disk, format: .qcow2, size: 4 << 20)
        let pattern = (0..<65536).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ 5) }
        try await Image.withOpened(disk) { img in
            try await img.write(pattern, at: 1 << 20)
            let address: NBDServer.Address = overTCP ? .tcp(host: "127.0.0.1", port: 0) : .unix(path: d.file("s.sock"))
            try await img.withNBDExport(name: "disk 1", at: address) { uri in
                #expect(uri.exportName == "disk 1")
                try await Image.withOpened(uri) { remote in
                    #expect(remote.size == 4 << 20)
                    #expect(try await remote.read(at: 1 << 20, count: pattern.count) == pattern)
                    try await remote.write([UInt8](repeating: 0xee, count: 4096), at: 0, flags: .fua)
                    try await remote.flush()
                }
            }
            #expect(try await img.read(at: 0, count: 4096) == [UInt8](repeating: 0xee, count: 4096))
        }
        #expect(try await apiContent(disk).prefix(4096) == ArraySlice([UInt8](repeating: 0xee, count: 4096)))
    }
}
