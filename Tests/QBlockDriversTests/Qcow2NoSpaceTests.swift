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

/// The host file of a qcow2 image refuses writes (ENOSPC, EIO) in the middle of a
/// concurrent workload; then space comes back. Afterwards:
/// - a clean close leaves an image `qemu-img check` finds free of errors *and* leaks;
/// - a process killed instead of closing leaves no corruption (leaks are then acceptable,
///   as they are for QEMU after a crash: clusters counted before they were referenced);
/// - every acknowledged write (and, after a kill, every write acknowledged before the last
///   completed flush) reads back with QEMU's tools;
/// - failed requests fail with ENOSPC/EIO naming the file, and later writes succeed.
///
/// Faults hit `pwrite` on the image's file descriptor only, in one of four patterns (see
/// ``Fault``). Seeds are printed; `QBLOCK_NOSPACE_SEED=<n>` reruns the random case with one seed.
@Suite(.serialized, .enabled(if: haveQemuImg, "qemu-img is not installed; `make test` installs qemu-utils"))
struct Qcow2NoSpaceTests {
    enum Fault: String, CaseIterable, Sendable {
        /// Every write from some point on (data, metadata, flushes of cached tables).
        case allWrites
        /// Writes at or beyond a limit a little past the current end of the file: a full
        /// disk, where overwriting allocated bytes still works.
        case beyondEnd
        /// Writes inside the file as it was when the fault started: mostly metadata
        /// (L1, L2 tables, refcount blocks, the header) and in-place data overwrites.
        case existingArea
        /// Each write fails with some probability.
        case random
    }

    enum Ending: String, Sendable {
        /// Space comes back, more writes, close.
        case close
        /// Space comes back, more writes, a flush, then a few unflushed writes and a kill.
        case killAfter
        /// Killed while the fault is still on.
        case killDuring
    }

    struct Case: CustomStringConvertible, Sendable {
        var seed: UInt64
        var clusterSize: Int
        var refcountBits = 16
        var backing = false
        var compressed = false
        var fault: Fault
        var err: Int32 = ENOSPC
        var ending: Ending = .close
        /// Longest request; large requests on 512-byte clusters with 64-bit refcounts make the
        /// refcount table grow while writes fail.
        var maxLength = 200_000
        var description: String {
            "seed=\(seed) cluster_size=\(clusterSize) refcount_bits=\(refcountBits) backing=\(backing) "
                + "compressed=\(compressed) fault=\(fault.rawValue) errno=\(err == ENOSPC ? "ENOSPC" : "EIO") ending=\(ending.rawValue) max_length=\(maxLength)"
        }
    }

    static let fixedCases: [Case] = [
        Case(seed: 1, clusterSize: 65536, fault: .allWrites),
        Case(seed: 2, clusterSize: 512, refcountBits: 64, fault: .beyondEnd),
        Case(seed: 3, clusterSize: 4096, backing: true, fault: .random, err: EIO),
        Case(seed: 4, clusterSize: 65536, backing: true, compressed: true, fault: .existingArea, err: EIO),
        Case(seed: 5, clusterSize: 512, backing: true, compressed: true, fault: .random),
        Case(seed: 6, clusterSize: 4096, compressed: true, fault: .beyondEnd),
        Case(seed: 7, clusterSize: 512, refcountBits: 64, fault: .allWrites),
        Case(seed: 8, clusterSize: 65536, fault: .existingArea),
        Case(seed: 9, clusterSize: 65536, fault: .random, err: EIO, ending: .killAfter),
        Case(seed: 10, clusterSize: 512, backing: true, fault: .allWrites, ending: .killDuring),
        Case(seed: 11, clusterSize: 4096, compressed: true, fault: .existingArea, ending: .killDuring),
        Case(seed: 12, clusterSize: 512, refcountBits: 64, compressed: true, fault: .random, ending: .killAfter),
        // Found by randomCase: a failed compressed write freed its fresh cluster, a data
        // write was given it whole, and the next compressed write packed its bytes after
        // the failed one's, over that data ("Could not decompress cluster").
        Case(seed: 797604440426, clusterSize: 512, backing: true, compressed: true, fault: .allWrites),
        Case(seed: 13, clusterSize: 512, refcountBits: 64, fault: .beyondEnd, maxLength: 1 << 20),
        Case(seed: 14, clusterSize: 512, refcountBits: 64, fault: .random, err: EIO, maxLength: 1 << 20),
        Case(seed: 15, clusterSize: 512, refcountBits: 64, compressed: true, fault: .allWrites, maxLength: 1 << 20),
    ]

    @Test(arguments: fixedCases)
    func faultThenSpaceComesBack(_ c: Case) async throws {
        try await Self.runCase(c)
    }

    /// Random parameters with a printed seed (or `QBLOCK_NOSPACE_SEED`).
    @Test(arguments: 0..<3)
    func randomCase(_ i: Int) async throws {
        let env = ProcessInfo.processInfo.environment["QBLOCK_NOSPACE_SEED"].flatMap { UInt64($0) }
        let seed = env ?? UInt64.random(in: 1_000...UInt64(1) << 40)
        if env != nil && i > 0 { return }
        var r = SplitMix(seed: seed)
        let sizes = [512, 4096, 65536]
        let cs = sizes[Int(r.next() % 3)]
        let c = Case(seed: seed, clusterSize: cs, refcountBits: cs == 512 && r.next() % 2 == 0 ? 64 : 16,
                     backing: r.next() % 2 == 0, compressed: r.next() % 2 == 0,
                     fault: Fault.allCases[Int(r.next() % 4)], err: r.next() % 2 == 0 ? ENOSPC : EIO,
                     ending: [Ending.close, .close, .killAfter, .killDuring][Int(r.next() % 4)])
        try await Self.runCase(c)
    }

    // MARK: The workload

    static let size = 6 << 20

    static func runCase(_ c: Case) async throws {
        print("nospace: \(c)")
        let dir = TempDir("qblock-nospace")
        let path = dir.file("img.qcow2")
        let size = Self.size
        var model = Model(size: size)
        var createArgs = ["create", "-q", "-f", "qcow2", "-o", "cluster_size=\(c.clusterSize),refcount_bits=\(c.refcountBits)"]
        if c.backing {
            let base = dir.file("base.qcow2")
            _ = try mustRun("qemu-img", "create", "-q", "-f", "qcow2", base, String(size))
            _ = try mustRun("qemu-io", "-c", "write -P 0xbb 0 \(size / 2)", "-c", "write -P 0xcc \(size - 65536) 65536", base)
            model.fill(0, size / 2, 0xbb)
            model.fill(size - 65536, 65536, 0xcc)
            createArgs += ["-b", base, "-F", "qcow2"]
        }
        _ = try run("qemu-img", createArgs + [path, String(size)])
        let node = try await ImageOpener.open(path)
        let qnode = try #require(node as? Qcow2Node)
        let file = try #require(qnode.hostFile as? FileNode)
        let injector = Injector(fault: c.fault, err: c.err, seed: c.seed)
        try await Syscalls.withInjector(path: path, { call, offset in injector.decide(call, offset) }) {
            var rng = SplitMix(seed: c.seed)
            var round = 0
            // 1. Healthy rounds, then a flush everything must survive. (One when requests are
            // large, so that the refcount table still has to grow once writes fail.)
            for _ in 0..<(c.maxLength > 200_000 ? 1 : 3) {
                let failures = try await runRound(qnode, &model, &rng, round: round, c)
                #expect(failures.isEmpty, "\(c): writes failed before any fault: \(failures.prefix(2))")
                round += 1
            }
            try await qnode.flush()
            model.flushed()
            // 2. The fault.
            let tableBefore = qnode.header.refcountTableClusters
            injector.start(fileLength: file.length, clusterSize: c.clusterSize)
            var failed = 0
            // Four rounds, and more (a bounded number) while the fault has not hit yet: with some
            // seeds the first rounds only rewrite clusters that are already allocated.
            var faultRounds = 0
            while faultRounds < 4 || (injector.failures == 0 && faultRounds < 16) {
                faultRounds += 1
                let failures = try await runRound(qnode, &model, &rng, round: round, c)
                failed += failures.count
                for f in failures {
                    guard let e = f as? BlockError else {
                        Issue.record("\(c): a failed request threw \(type(of: f)): \(f)")
                        continue
                    }
                    #expect(e.errno == c.err && e.path != nil, "\(c): unexpected error \(e)")
                }
                do { try await qnode.flush(); model.flushed() } catch { failed += 1 }
                round += 1
            }
            print("nospace \(c.seed): \(injector.failures) writes refused, \(failed) requests or flushes failed; "
                  + "refcount table \(tableBefore) → \(qnode.header.refcountTableClusters) clusters")
            #expect(injector.failures > 0, "\(c): the fault never hit")
            if c.ending == .killDuring {
                try await kill(qnode)
                model.crashed()
                try verify(path, dir, model, c, afterCrash: true)
                return
            }
            // 3. Space is back: everything works again, including the flush of what was left dirty.
            injector.stop()
            for _ in 0..<2 {
                let failures = try await runRound(qnode, &model, &rng, round: round, c)
                #expect(failures.isEmpty, "\(c): writes failed after space came back: \(failures.prefix(2))")
                round += 1
            }
            try await qnode.flush()
            model.flushed()
            // Our own reads agree with the model before the image is closed.
            let mine = try await read(qnode, at: 0, count: size)
            #expect(model.firstMismatch(mine) == nil, "\(c): our read differs from the model at \(model.firstMismatch(mine) ?? -1)")
            if c.ending == .killAfter {
                // Unflushed writes then a kill: their bytes are unknown.
                _ = try await runRound(qnode, &model, &rng, round: round, c)
                try await kill(qnode)
                model.crashed()
                try verify(path, dir, model, c, afterCrash: true)
                return
            }
            try await node.close()
            try verify(path, dir, model, c, afterCrash: false)
        }
    }

    /// "Kills" the process: the host file is closed without flushing the qcow2 caches.
    static func kill(_ q: Qcow2Node) async throws {
        try await q.hostFile.close()
        try await q.backing?.close()
    }

    static func verify(_ path: String, _ dir: TempDir, _ model: Model, _ c: Case, afterCrash: Bool) throws {
        let check = try run("qemu-img", "check", path)
        if afterCrash {
            #expect(check.status == 0 || check.status == 3, "\(c): corrupt after a crash: \(check)")
        } else {
            #expect(check.status == 0, "\(c): qemu-img check after a clean close: \(check)")
        }
        let raw = dir.file("out.raw")
        _ = try mustRun("qemu-img", "convert", "-O", "raw", path, raw)
        let bytes = try [UInt8](Data(contentsOf: URL(fileURLWithPath: raw)))
        if let at = model.firstMismatch(bytes) {
            Issue.record("\(c): qemu-img reads 0x\(String(bytes[at], radix: 16)) at \(at), acknowledged 0x\(String(model.bytes[at], radix: 16))")
        }
    }

    enum OpKind { case write, compressed, zero }

    /// One round of concurrent, non-overlapping requests. Returns the errors of the failed ones.
    static func runRound(_ q: Qcow2Node, _ model: inout Model, _ rng: inout SplitMix, round: Int, _ c: Case) async throws -> [Error] {
        let cs = c.clusterSize
        var ops: [(kind: OpKind, offset: Int, data: [UInt8])] = []
        var taken: [Range<Int>] = []
        for i in 0..<24 {
            var kind: OpKind = .write
            let roll = rng.next() % 10
            if c.compressed && roll < 3 { kind = .compressed } else if roll == 9 { kind = .zero }
            var offset = 0, length = 0
            for _ in 0..<10 {
                if kind == .compressed {
                    offset = Int(rng.next() % UInt64(size / cs)) * cs
                    length = cs
                } else {
                    let longest = c.maxLength > 200_000 ? c.maxLength : min(3 * cs + 1000, c.maxLength)
                    length = 1 + Int(rng.next() % UInt64(longest))
                    offset = Int(rng.next() % UInt64(size - length))
                }
                if !taken.contains(where: { $0.overlaps(offset..<(offset + length)) }) { break }
                length = 0
            }
            if length == 0 { continue }
            taken.append(offset..<(offset + length))
            let tag = UInt8(truncatingIfNeeded: round &* 37 &+ i &* 5 &+ 1)
            let data: [UInt8]
            switch kind {
            case .zero: data = [UInt8](repeating: 0, count: length)
            case .compressed: data = (0..<length).map { $0 < length / 2 ? tag : UInt8(truncatingIfNeeded: $0 / 64) }
            case .write: data = (0..<length).map { UInt8(truncatingIfNeeded: Int(tag) &+ $0 / 509) }
            }
            ops.append((kind, offset, data))
        }
        let results: [(Int, Error?)] = await withTaskGroup(of: (Int, Error?).self) { g in
            for (i, op) in ops.enumerated() {
                g.addTask {
                    do {
                        switch op.kind {
                        case .write: try await write(q, at: Int64(op.offset), op.data)
                        case .zero: try await q.writeZeroes(at: Int64(op.offset), length: Int64(op.data.count), flags: [])
                        case .compressed:
                            let buf = AlignedBuffer(count: op.data.count)
                            op.data.withUnsafeBytes { src in buf.withUnsafeMutableBytes { $0.copyMemory(from: src) } }
                            try await buf.withUnsafeBytes { try await q.writeCompressedCluster(at: Int64(op.offset), data: $0) }
                        }
                        return (i, nil)
                    } catch {
                        return (i, error)
                    }
                }
            }
            var out: [(Int, Error?)] = []
            for await r in g { out.append(r) }
            return out
        }
        var failures: [Error] = []
        for (i, err) in results {
            let op = ops[i]
            if let e = err as? BlockError, e.code == .unsupported, op.kind == .compressed {
                continue  // the cluster was allocated: nothing written, as in QEMU
            }
            if err == nil {
                model.set(op.offset, op.data)
            } else {
                model.forget(op.offset, op.data.count)
                if let err { failures.append(err) }
            }
        }
        return failures
    }

    // MARK: One kind of metadata write refused

    enum Target: String, CaseIterable, Sendable {
        /// The header (the refcount table switch when the table grows).
        case header
        /// L1 entries (new L2 tables).
        case l1Table
        /// Refcount table entries (new refcount blocks).
        case refcountTable
        /// Anything past the end of the file as it was (new tables, blocks, data).
        case pastTheEnd
    }

    /// Sequential 64 KiB writes over a 512-byte-cluster image with 64-bit refcounts (a new L2
    /// table every 32 KiB, a new refcount block every 32 KiB, the refcount table grows) while
    /// one kind of metadata write is refused; then the failed requests are written again.
    @Test(arguments: Target.allCases)
    func oneKindOfMetadataWriteRefused(_ target: Target) async throws {
        let dir = TempDir("qblock-nospace")
        let path = dir.file("img.qcow2")
        let size = 8 << 20
        _ = try mustRun("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512,refcount_bits=64", path, String(size))
        let node = try await ImageOpener.open(path)
        let q = try #require(node as? Qcow2Node)
        let l1 = Int64(q.header.l1TableOffset)..<(Int64(q.header.l1TableOffset) + Int64(q.header.l1Size) * 8)
        let rt = Int64(q.header.refcountTableOffset)..<(Int64(q.header.refcountTableOffset) + Int64(q.header.refcountTableClusters) * 512)
        let end = q.hostFile.length
        let refused = Counter()
        var model = Model(size: size)
        var failedOffsets: [Int] = []
        try await Syscalls.withInjector(path: path, { call, offset in
            guard call == .pwrite else { return nil }
            let hit: Bool
            switch target {
            case .header: hit = offset < 512
            case .l1Table: hit = l1.contains(offset)
            case .refcountTable: hit = rt.contains(offset)
            case .pastTheEnd: hit = offset >= end
            }
            if hit { refused.add() }
            return hit ? ENOSPC : nil
        }) {
            for off in stride(from: 0, to: size, by: 65536) {
                let data = [UInt8](repeating: UInt8(truncatingIfNeeded: off >> 16) | 1, count: 65536)
                do {
                    try await write(q, at: Int64(off), data)
                    model.set(off, data)
                } catch {
                    let e = try #require(error as? BlockError)
                    #expect(e.errno == ENOSPC && e.path != nil, "\(e)")
                    model.forget(off, 65536)
                    failedOffsets.append(off)
                }
            }
            _ = try? await q.flush()
        }
        print("nospace \(target): \(refused.value) writes refused, \(failedOffsets.count) requests failed")
        #expect(refused.value > 0 && !failedOffsets.isEmpty)
        for off in failedOffsets {
            let data = [UInt8](repeating: 0xa5, count: 65536)
            try await write(q, at: Int64(off), data)
            model.set(off, data)
        }
        try await node.close()
        let check = try run("qemu-img", "check", path)
        #expect(check.status == 0, "\(target): \(check)")
        let raw = dir.file("out.raw")
        _ = try mustRun("qemu-img", "convert", "-O", "raw", path, raw)
        let bytes = try [UInt8](Data(contentsOf: URL(fileURLWithPath: raw)))
        #expect(model.firstMismatch(bytes) == nil, "\(target): differs at \(model.firstMismatch(bytes) ?? -1)")
    }

    // MARK: A real full file system

    /// A 4 MiB tmpfs (root only): the image grows until the file system is full, then a
    /// filler file is removed and writing goes on.
    @Test func realTmpfsFillsUp() async throws {
        guard getuid() == 0 else { print("nospace: not root, tmpfs test skipped"); return }
        let mnt = TempDir("qblock-tmpfs")
        let m = try run("mount", "-t", "tmpfs", "-o", "size=4M", "tmpfs", mnt.path)
        guard m.status == 0 else { print("nospace: cannot mount tmpfs (\(m.stderr)); test skipped"); return }
        defer { _ = try? run("umount", mnt.path) }
        let filler = mnt.file("filler")
        #expect(FileManager.default.createFile(atPath: filler, contents: Data(count: 1 << 20)))
        let path = mnt.file("img.qcow2")
        _ = try mustRun("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", path, "16M")
        let node = try await ImageOpener.open(path)
        let q = try #require(node as? Qcow2Node)
        var model = Model(size: 16 << 20)
        var sawNoSpace = false
        var i = 0
        while i < 2000 && !sawNoSpace {
            // Batches of concurrent writes of 64 KiB at distinct places.
            let batch = (0..<8).map { j in ((i + j) * 65536 * 7) % (16 << 20) }
            let results: [(Int, Error?)] = await withTaskGroup(of: (Int, Error?).self) { g in
                for (k, off) in batch.enumerated() {
                    let data = [UInt8](repeating: UInt8(truncatingIfNeeded: i + k + 1), count: 65536)
                    g.addTask {
                        do { try await write(q, at: Int64(off), data); return (k, nil) } catch { return (k, error) }
                    }
                }
                var out: [(Int, Error?)] = []
                for await r in g { out.append(r) }
                return out
            }
            for (k, err) in results {
                let off = batch[k]
                if let err {
                    let e = try #require(err as? BlockError)
                    #expect(e.code == .noSpace, "\(e)")
                    sawNoSpace = true
                    model.forget(off, 65536)
                } else {
                    model.set(off, [UInt8](repeating: UInt8(truncatingIfNeeded: i + k + 1), count: 65536))
                }
            }
            i += 8
        }
        #expect(sawNoSpace)
        _ = try? await q.flush()
        try FileManager.default.removeItem(atPath: filler)
        for j in 0..<4 {
            let data = [UInt8](repeating: 0xe0 &+ UInt8(j), count: 65536)
            try await write(q, at: Int64(j * 65536 + 32768), data)
            model.set(j * 65536 + 32768, data)
        }
        try await node.close()
        let check = try run("qemu-img", "check", path)
        #expect(check.status == 0, "\(check)")
        let raw = NSTemporaryDirectory() + "qblock-tmpfs-\(getpid()).raw"
        defer { try? FileManager.default.removeItem(atPath: raw) }
        _ = try mustRun("qemu-img", "convert", "-O", "raw", path, raw)
        let bytes = try [UInt8](Data(contentsOf: URL(fileURLWithPath: raw)))
        #expect(model.firstMismatch(bytes) == nil)
    }
}

// MARK: - Helpers

/// What the image must hold: bytes, and whether each is known (a failed request leaves its
/// range unknown until a later write succeeds there).
struct Model {
    var bytes: [UInt8]
    var known: [Bool]
    init(size: Int) {
        bytes = [UInt8](repeating: 0, count: size)
        known = [Bool](repeating: true, count: size)
    }
    mutating func fill(_ offset: Int, _ length: Int, _ v: UInt8) {
        for i in offset..<(offset + length) { bytes[i] = v; known[i] = true }
    }
    /// Ranges acknowledged since the last completed flush: unknown after a crash.
    var unflushed: [Range<Int>] = []
    mutating func flushed() { unflushed.removeAll() }
    mutating func crashed() {
        for r in unflushed { forget(r.lowerBound, r.count) }
        unflushed.removeAll()
    }
    mutating func set(_ offset: Int, _ data: [UInt8]) {
        unflushed.append(offset..<(offset + data.count))
        bytes.replaceSubrange(offset..<(offset + data.count), with: data)
        known.replaceSubrange(offset..<(offset + data.count), with: repeatElement(true, count: data.count))
    }
    mutating func forget(_ offset: Int, _ length: Int) {
        known.replaceSubrange(offset..<(offset + length), with: repeatElement(false, count: length))
    }
    func firstMismatch(_ other: [UInt8]) -> Int? {
        if other.count != bytes.count { return min(other.count, bytes.count) }
        for i in 0..<bytes.count where known[i] && bytes[i] != other[i] { return i }
        return nil
    }
}

// @unchecked Sendable: `n` is only touched with `lock` held.
final class Counter: @unchecked Sendable {
    private let lock = NSLock()
    private var n = 0
    func add() { lock.lock(); n += 1; lock.unlock() }
    var value: Int { lock.lock(); defer { lock.unlock() }; return n }
}

/// Decides, per `pwrite` on one file, whether it fails.
// @unchecked Sendable: the vars are only touched with `lock` held; the lets are immutable.
final class Injector: @unchecked Sendable {
    let fault: Qcow2NoSpaceTests.Fault
    let err: Int32
    private let lock = NSLock()
    private var rng: SplitMix
    private var active = false
    private var skip = 0
    private var limit: Int64 = 0
    private(set) var failures = 0

    init(fault: Qcow2NoSpaceTests.Fault, err: Int32, seed: UInt64) {
        self.fault = fault
        self.err = err
        rng = SplitMix(seed: seed ^ 0x5eed)
    }

    func start(fileLength: Int64, clusterSize: Int) {
        lock.lock(); defer { lock.unlock() }
        active = true
        switch fault {
        case .allWrites: skip = Int(rng.next() % 40)
        case .beyondEnd: limit = fileLength + Int64(rng.next() % 8) * Int64(clusterSize)
        case .existingArea: limit = fileLength
        case .random: break
        }
    }

    func stop() { lock.lock(); active = false; lock.unlock() }

    func decide(_ call: Syscalls.Call, _ offset: Int64) -> Int32? {
        guard call == .pwrite else { return nil }
        lock.lock(); defer { lock.unlock() }
        guard active else { return nil }
        let fail: Bool
        switch fault {
        case .allWrites:
            if skip > 0 { skip -= 1; fail = false } else { fail = true }
        case .beyondEnd: fail = offset >= limit
        case .existingArea: fail = offset < limit
        case .random: fail = rng.next() % 10 < 3
        }
        if fail { failures += 1 }
        return fail ? err : nil
    }
}
