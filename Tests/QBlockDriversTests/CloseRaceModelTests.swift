import Foundation
import Synchronization
import Testing
import TestSupport
@testable import QBlock

/// A seeded, randomized model test of `close()` racing I/O (the fixed-pattern version is
/// ``CloseSafetyTests``): N tasks run random reads, writes, write-zeroes, discards and flushes
/// on one image (qcow2, raw over a file node, a bare file node, or a block backend over
/// qcow2), each on byte ranges it alone owns (chunks dealt round-robin, so tasks share
/// clusters and tables), checked against a byte model; after a random number of completed
/// calls, `close()` runs concurrently, and once it returns other files are opened to take the
/// freed descriptor numbers.
///
/// Invariants:
/// - a call completes with the model's bytes (a read) or fails with `BlockError` `.closed`,
///   never with another error, partial or foreign bytes (reads fill a sentinel buffer);
/// - once one call failed with `.closed`, every later call does, and every call started after
///   `close()` returned does;
/// - nothing hangs (each case is bounded by a timeout);
/// - the image, reopened, holds every successful write; a write, write-zeroes or discard that
///   failed with `.closed` may or may not have landed (its range holds the old or the new
///   bytes); `qemu-img check` finds nothing wrong with a qcow2 image (skipped without QEMU).
///
/// Every case prints `seed=…`; a failing case is shrunk (fewer tasks, fewer calls) and its
/// reproducer printed. Environment:
/// - `QBLOCK_CLOSERACE_SEED=N` runs that seed only (every format, or `QBLOCK_CLOSERACE_FORMAT`'s:
///   raw, qcow2, file or backend);
/// - `QBLOCK_CLOSERACE_TASKS`, `QBLOCK_CLOSERACE_OPS`, `QBLOCK_CLOSERACE_CLOSE_AFTER` override what
///   the seed chose (the shrunk reproducer sets them);
/// - `QBLOCK_CLOSERACE_SECONDS=S` runs random seeds for S seconds per format (the long mode).
@Suite struct CloseRaceModelTests {
    /// qcow2; raw over a file; a bare file node (its own close gate, with nothing above it);
    /// a block backend over a qcow2 node (the backend is closed, then the node, as the graph
    /// does).
    enum Format: String, CaseIterable, Sendable, CustomTestStringConvertible {
        case raw, qcow2, file, backend
        var testDescription: String { rawValue }
        var isQcow2: Bool { self == .qcow2 || self == .backend }
    }

    // MARK: Cases

    /// One case: the seed decides the image layout and every task's calls; tasks, calls per
    /// task and the close point can be overridden (shrinking does).
    struct Case: Sendable, CustomStringConvertible {
        var seed: UInt64
        var format: Format
        var tasks: Int
        var opsPerTask: Int
        /// Calls completed (over all tasks) before `close()` starts; 0 closes before any call.
        var closeAfter: Int
        // Layout, from the seed alone (shrinking keeps it).
        var chunk: Int
        var chunksPerTask: Int
        var clusterSize: Int
        var lazyRefcounts: Bool

        static let maxTasks = 8

        init(seed: UInt64, format: Format) {
            self.seed = seed
            self.format = format
            var r = SplitMix(seed: seed)
            chunk = [4096, 16384, 65536, 131072][Int(r.next() % 4)]
            chunksPerTask = 2 + Int(r.next() % 5)
            clusterSize = [512, 4096, 65536, 65536][Int(r.next() % 4)]
            lazyRefcounts = r.next() % 4 == 0
            tasks = 2 + Int(r.next() % UInt64(Self.maxTasks - 1))
            opsPerTask = 10 + Int(r.next() % 110)
            closeAfter = Int(r.next() % UInt64(tasks * opsPerTask + 1))
        }

        var size: Int { chunk * chunksPerTask * tasks }

        var description: String {
            var s = "seed=\(seed) format=\(format.rawValue) tasks=\(tasks) ops=\(opsPerTask) closeAfter=\(closeAfter) chunk=\(chunk)x\(chunksPerTask)"
            if format.isQcow2 { s += " cluster=\(clusterSize) lazyRefcounts=\(lazyRefcounts)" }
            return s
        }

        var reproducer: String {
            "QBLOCK_CLOSERACE_SEED=\(seed) QBLOCK_CLOSERACE_FORMAT=\(format.rawValue) QBLOCK_CLOSERACE_TASKS=\(tasks) "
                + "QBLOCK_CLOSERACE_OPS=\(opsPerTask) QBLOCK_CLOSERACE_CLOSE_AFTER=\(closeAfter) "
                + "swift test --skip-build --filter CloseRaceModelTests"
        }

        /// The case for `seed`, with the environment's overrides.
        static func from(seed: UInt64, format: Format) -> Case {
            var c = Case(seed: seed, format: format)
            if let t = env("TASKS").flatMap(Int.init), t >= 1 { c.tasks = t }
            if let o = env("OPS").flatMap(Int.init), o >= 0 { c.opsPerTask = o }
            c.closeAfter = min(c.closeAfter, c.tasks * c.opsPerTask)
            if let k = env("CLOSE_AFTER").flatMap(Int.init), k >= 0 { c.closeAfter = min(k, c.tasks * c.opsPerTask) }
            return c
        }
    }

    static func env(_ name: String) -> String? { ProcessInfo.processInfo.environment["QBLOCK_CLOSERACE_\(name)"] }

    static let fixedSeed: UInt64? = env("SEED").flatMap { UInt64($0) }
    static let onlyFormat: Format? = env("FORMAT").flatMap { Format(rawValue: $0) }
    static let longSeconds: Double? = env("SECONDS").flatMap { Double($0) }

    /// `make test`: a few fixed seeds (a failure reproduces) and one new seed per run.
    static let seeds: [UInt64] = fixedSeed.map { [$0] } ?? [1, 2, 3, 4, 0]

    @Test(arguments: Format.allCases, seeds)
    func closeRacingIOKeepsTheModel(_ format: Format, _ listed: UInt64) async throws {
        guard Self.longSeconds == nil, Self.onlyFormat == nil || Self.onlyFormat == format else { return }
        // Seed 0 in the list stands for a fresh random one (printed like the others).
        let seed = listed != 0 ? listed : UInt64.random(in: 1_000...UInt64(1) << 40)
        try await Self.runAndShrink(Case.from(seed: seed, format: format), shrinkSeconds: 30)
    }

    /// The long mode: random seeds until `QBLOCK_CLOSERACE_SECONDS` have passed.
    @Test(arguments: Format.allCases)
    func soak(_ format: Format) async throws {
        guard let seconds = Self.longSeconds, Self.onlyFormat == nil || Self.onlyFormat == format else { return }
        let end = Date().addingTimeInterval(seconds)
        var count = 0, failed: [UInt64] = []
        while Date() < end {
            let seed = UInt64.random(in: 1_000...UInt64(1) << 40)
            let ok = try await Self.runAndShrink(Case.from(seed: seed, format: format), shrinkSeconds: 120)
            count += 1
            if !ok { failed.append(seed) }
        }
        print("close race soak (\(format.rawValue)): \(count) seeds, failing: \(failed)")
    }

    // MARK: Running, shrinking

    /// Runs `c`; on failure shrinks it and records the failure with the shortest reproducer.
    /// Returns whether it passed.
    @discardableResult
    static func runAndShrink(_ c: Case, shrinkSeconds: Double) async throws -> Bool {
        let started = ContinuousClock.now
        let failures = try await runCase(c)
        print("close race: \(c): \(failures.isEmpty ? "pass" : "FAIL") in \(ContinuousClock.now - started)")
        guard !failures.isEmpty else { return true }
        for f in failures.prefix(8) { print("  \(f)") }
        var best = c
        var bestFailures = failures
        let deadline = ContinuousClock.now + .seconds(shrinkSeconds)
        var progress = true
        shrinking: while progress {
            progress = false
            for candidate in shrinkCandidates(best) {
                // Races do not always reproduce: a candidate fails if any of three runs does.
                for _ in 0..<3 {
                    if ContinuousClock.now > deadline { break shrinking }
                    let f = try await runCase(candidate, quiet: true)
                    if !f.isEmpty {
                        best = candidate
                        bestFailures = f
                        print("close race: shrunk to \(candidate)")
                        progress = true
                        continue shrinking
                    }
                }
            }
        }
        print("close race: reproducer: \(best.reproducer)")
        Issue.record("close racing I/O broke the model: \(c)\n  shrunk: \(best)\n  \(bestFailures.prefix(4).joined(separator: "\n  "))\n  reproduce with: \(best.reproducer)")
        return false
    }

    /// Smaller cases: fewer tasks, fewer calls per task, an earlier close.
    static func shrinkCandidates(_ c: Case) -> [Case] {
        var out: [Case] = []
        func add(tasks: Int, ops: Int, closeAfter: Int) {
            var n = c
            n.tasks = max(1, tasks)
            n.opsPerTask = max(0, ops)
            n.closeAfter = min(max(0, closeAfter), n.tasks * n.opsPerTask)
            if (n.tasks, n.opsPerTask, n.closeAfter) != (c.tasks, c.opsPerTask, c.closeAfter) { out.append(n) }
        }
        let scaled = { (t: Int, o: Int) in c.tasks * c.opsPerTask == 0 ? 0 : c.closeAfter * t * o / (c.tasks * c.opsPerTask) }
        add(tasks: c.tasks / 2, ops: c.opsPerTask, closeAfter: scaled(c.tasks / 2, c.opsPerTask))
        add(tasks: c.tasks, ops: c.opsPerTask / 2, closeAfter: scaled(c.tasks, c.opsPerTask / 2))
        add(tasks: c.tasks - 1, ops: c.opsPerTask, closeAfter: scaled(c.tasks - 1, c.opsPerTask))
        add(tasks: c.tasks, ops: c.opsPerTask * 3 / 4, closeAfter: scaled(c.tasks, c.opsPerTask * 3 / 4))
        add(tasks: c.tasks, ops: c.opsPerTask, closeAfter: c.closeAfter / 2)
        return out
    }

    // MARK: The calls

    enum Op: CustomStringConvertible {
        case read(Int, Int)
        case write(Int, Int, fua: Bool, data: UInt64)
        case zeroes(Int, Int, unmap: Bool)
        case discard(Int, Int)
        case flush

        var description: String {
            switch self {
            case .read(let o, let n): return "read \(o)+\(n)"
            case .write(let o, let n, let fua, _): return "write \(o)+\(n)\(fua ? " fua" : "")"
            case .zeroes(let o, let n, let unmap): return "zeroes \(o)+\(n)\(unmap ? " unmap" : "")"
            case .discard(let o, let n): return "discard \(o)+\(n)"
            case .flush: return "flush"
            }
        }

        /// The bytes a write puts (deterministic from the op).
        static func bytes(_ seed: UInt64, _ n: Int) -> [UInt8] {
            var r = SplitMix(seed: seed)
            var words = [UInt64](repeating: 0, count: (n + 7) / 8)
            for i in words.indices { words[i] = r.next() }
            // SAFETY: `words` holds at least `n` bytes.
            return words.withUnsafeBytes { Array($0.prefix(n)) }
        }
    }

    /// Task `t`'s calls: each on one chunk it owns (chunk `j * tasks + t`), 512-byte aligned
    /// mostly, byte-granular sometimes.
    static func ops(_ c: Case, task t: Int) -> [Op] {
        var r = SplitMix(seed: c.seed &+ UInt64(t + 1) &* 0x9e37_79b9_7f4a_7c15)
        var out: [Op] = []
        for _ in 0..<c.opsPerTask {
            let chunk = Int(r.next() % UInt64(c.chunksPerTask)) * c.tasks + t
            let base = chunk * c.chunk
            let unit = r.next() % 8 == 0 ? 1 : 512
            let slots = c.chunk / unit
            let a = Int(r.next() % UInt64(slots)), b = Int(r.next() % UInt64(slots))
            var off = min(a, b) * unit, len = (max(a, b) - min(a, b) + 1) * unit
            if unit == 1 { len = min(len, c.chunk - off) }
            if off + len > c.chunk { off = c.chunk - len }
            let at = base + off
            switch r.next() % 100 {
            case 0..<35: out.append(.read(at, len))
            case 35..<70: out.append(.write(at, len, fua: r.next() % 8 == 0, data: r.next()))
            case 70..<82: out.append(.zeroes(at, len, unmap: r.next() % 2 == 0))
            case 82..<92: out.append(.discard(at, len))
            default: out.append(.flush)
            }
        }
        return out
    }

    // MARK: The model

    /// What one task knows of the bytes it owns (its chunks, in order): per byte, the value,
    /// and whether zero is possible too (a discard may or may not zero). Calls stay inside
    /// one chunk, so a call's bytes are contiguous here; bulk work goes through memcpy,
    /// memset and memcmp (the per-byte loops are slow in debug builds).
    struct TaskModel: Sendable {
        var value: [UInt8]
        /// 1 where zero is possible as well as `value`.
        var zeroToo: [UInt8]
        let chunk: Int
        let tasks: Int

        init(_ c: Case) {
            value = [UInt8](repeating: 0, count: c.chunk * c.chunksPerTask)
            zeroToo = value
            chunk = c.chunk
            tasks = c.tasks
        }

        /// The index of image byte `offset` (in a chunk this task owns).
        @inline(__always) func index(_ offset: Int) -> Int { offset / chunk / tasks * chunk + offset % chunk }

        /// The value at `offset` is `bytes` (a write, or a successful read settling an "either").
        mutating func set(_ offset: Int, _ bytes: UnsafeRawBufferPointer) {
            let i = index(offset)
            // SAFETY: a call's range lies in one chunk, so `i..<i + bytes.count` is inside both arrays.
            value.withUnsafeMutableBytes { _ = memcpy($0.baseAddress! + i, bytes.baseAddress!, bytes.count) }
            zeroToo.withUnsafeMutableBytes { _ = memset($0.baseAddress! + i, 0, bytes.count) }
        }

        mutating func set(_ offset: Int, _ bytes: [UInt8]) { bytes.withUnsafeBytes { set(offset, $0) } }

        /// A discard: each byte keeps its value or becomes zero.
        mutating func mayZero(_ offset: Int, _ count: Int) {
            let i = index(offset)
            // SAFETY: as in `set`.
            zeroToo.withUnsafeMutableBytes { _ = memset($0.baseAddress! + i, 1, count) }
        }

        /// Whether `b` is a possible value of image byte `offset`.
        func allows(_ b: UInt8, at offset: Int) -> Bool {
            let i = index(offset)
            return b == value[i] || (zeroToo[i] != 0 && b == 0)
        }

        /// Whether every byte of `bytes` at `offset` is possible (memcmp first, bytes then).
        func allows(_ bytes: UnsafeRawBufferPointer, at offset: Int) -> Bool {
            let i = index(offset)
            // SAFETY: as in `set`.
            let same = value.withUnsafeBytes { memcmp($0.baseAddress! + i, bytes.baseAddress!, bytes.count) == 0 }
            return same || bytes.indices.allSatisfy { allows(bytes[$0], at: offset + $0) }
        }

        func describe(_ offset: Int) -> String {
            let i = index(offset)
            return "0x" + String(value[i], radix: 16) + (zeroToo[i] != 0 ? " or 0" : "")
        }
    }

    /// What a task reports back.
    struct TaskResult: Sendable {
        var model: TaskModel
        /// Writes (or zeroes/discards, as zero bytes) that failed with `.closed`: landed or not.
        var uncertain: [(at: Int, bytes: [UInt8], what: String)] = []
        var failures: [String] = []
        var calls = 0
        var closedCalls = 0
        init(model: TaskModel) { self.model = model }
    }

    /// State the tasks share: the completed-call count that triggers the close, and the close's progress.
    final class Shared: Sendable {
        /// The node below the one under test that its owner closes right after it (backend).
        let below: (any BlockDriver)?
        init(below: (any BlockDriver)?) { self.below = below }
        let completed = Atomic<Int>(0)
        /// 0 before close, 1 while it runs, 2 once it returned.
        let closeState = Atomic<Int>(0)
        let closer = Mutex<Task<CloseOutcome, Never>?>(nil)
    }

    struct CloseOutcome: Sendable {
        var error: String?
        var thieves: [FileNode] = []
    }

    /// Starts `close()` (once), then opens other files to take the freed descriptor numbers.
    static func startClose(_ node: any BlockDriver, _ shared: Shared, distractor: String) {
        guard shared.closeState.compareExchange(expected: 0, desired: 1, ordering: .sequentiallyConsistent).exchanged else { return }
        let t = Task { () -> CloseOutcome in
            var out = CloseOutcome()
            do { try await node.close() } catch { out.error = "close() threw: \(error)" }
            shared.closeState.store(2, ordering: .sequentiallyConsistent)
            if let below = shared.below {
                do { try await below.close() } catch { out.error = "close() of the node below threw: \(error)" }
            }
            for _ in 0..<16 {
                if let f = try? FileNode(path: distractor, readOnly: true, locking: false) { out.thieves.append(f) }
            }
            return out
        }
        shared.closer.withLock { $0 = t }
    }

    enum Outcome { case ok, closed, failed(String) }

    static func classify(_ error: any Error) -> Outcome {
        if let e = error as? BlockError, e.code == .closed { return .closed }
        return .failed("\(type(of: error)): \(error)")
    }

    /// Runs task `t`'s calls on `node`.
    static func worker(_ c: Case, _ t: Int, _ node: any BlockDriver, _ initial: TaskModel,
                       _ shared: Shared, distractor: String) async -> TaskResult {
        var res = TaskResult(model: initial)
        var sawClosed = false
        var closedInARow = 0
        let buf = AlignedBuffer(count: c.chunk)
        for (i, op) in ops(c, task: t).enumerated() {
            let afterClose = shared.closeState.load(ordering: .sequentiallyConsistent) == 2
            var outcome: Outcome
            var written: (Int, [UInt8])?
            var got: [UInt8] = []
            do {
                switch op {
                case .read(let at, let n):
                    let sentinel = UInt8(truncatingIfNeeded: i &* 37 &+ 0x5b)
                    try await buf.withUnsafeMutableBytes { b in
                        let part = UnsafeMutableRawBufferPointer(rebasing: b[0..<n])
                        part.initializeMemory(as: UInt8.self, repeating: sentinel)
                        try await node.read(at: Int64(at), into: part)
                        got = Array(part)
                    }
                case .write(let at, let n, let fua, let seed):
                    let data = Op.bytes(seed, n)
                    written = (at, data)
                    try await node.write(at: Int64(at), bytes: data, flags: fua ? [.fua] : [])
                case .zeroes(let at, let n, let unmap):
                    written = (at, [UInt8](repeating: 0, count: n))
                    try await node.writeZeroes(at: Int64(at), length: Int64(n), flags: unmap ? [.mayUnmap] : [])
                case .discard(let at, let n):
                    written = (at, [UInt8](repeating: 0, count: n))
                    try await node.discard(at: Int64(at), length: Int64(n))
                case .flush:
                    try await node.flush()
                }
                outcome = .ok
            } catch {
                outcome = classify(error)
            }
            res.calls += 1
            let what = "task \(t) call \(i) (\(op))"
            switch outcome {
            case .ok:
                if afterClose { res.failures.append("\(what) succeeded although close() had returned") }
                if sawClosed { res.failures.append("\(what) succeeded after an earlier call failed with .closed") }
                closedInARow = 0
                switch op {
                case .read(let at, _):
                    if let m = mismatch(got, at: at, &res.model, distractorByte: distractorByte) {
                        res.failures.append("\(what) returned wrong bytes: \(m)")
                    }
                case .write, .zeroes:
                    let (at, data) = written!
                    res.model.set(at, data)
                case .discard(let at, let n):
                    res.model.mayZero(at, n)
                case .flush: break
                }
            case .closed:
                sawClosed = true
                closedInARow += 1
                if let w = written { res.uncertain.append((w.0, w.1, what)) }
                res.closedCalls += 1
            case .failed(let why):
                res.failures.append("\(what) failed with something other than .closed: \(why)")
                if let w = written { res.uncertain.append((w.0, w.1, what)) }
            }
            if shared.completed.add(1, ordering: .sequentiallyConsistent).newValue == c.closeAfter {
                startClose(node, shared, distractor: distractor)
            }
            if closedInARow >= 3 { break }
        }
        return res
    }

    static let distractorByte: UInt8 = 0xee

    /// Compares bytes read at `at` with the model; settles "either" bytes to what was read.
    /// Returns a description of the difference, or nil.
    static func mismatch(_ got: [UInt8], at: Int, _ model: inout TaskModel, distractorByte: UInt8) -> String? {
        let ok = got.withUnsafeBytes { model.allows($0, at: at) }
        if ok {
            model.set(at, got)
            return nil
        }
        let bad = got.indices.filter { !model.allows(got[$0], at: at + $0) }
        let k = bad[0]
        let foreign = got.allSatisfy { $0 == distractorByte } ? " (all of it the other file's byte 0x\(String(distractorByte, radix: 16)))" : ""
        return "\(bad.count) bytes differ, first at \(at + k): got 0x\(String(got[k], radix: 16)), model \(model.describe(at + k))\(foreign)"
    }

    // MARK: One case

    /// Runs one case; returns what went wrong (empty: it passed).
    static func runCase(_ c: Case, quiet: Bool = false, timeout: Double = 60) async throws -> [String] {
        if !quiet { print("close race: \(c)") }
        let dir = TempDir("closerace")
        let path = dir.file(c.format.isQcow2 ? "img.qcow2" : "img.raw")
        let distractor = dir.file("other.raw")
        try writeFile(distractor, at: 0, [UInt8](repeating: distractorByte, count: 1 << 20))
        var failures: [String] = []

        // The image, and a first (uncontended) pass writing half the chunks, so that reads,
        // discards and zeroes meet allocated data.
        var r = SplitMix(seed: c.seed ^ 0x5eed)
        var initial = [TaskModel](repeating: TaskModel(c), count: c.tasks)
        let node: any BlockDriver
        var below: (any BlockDriver)?
        switch c.format {
        case .raw, .file:
            let fill = Op.bytes(r.next(), c.size)
            try writeFile(path, at: 0, fill)
            for t in 0..<c.tasks {
                for j in 0..<c.chunksPerTask {
                    let base = (j * c.tasks + t) * c.chunk
                    initial[t].set(base, Array(fill[base..<(base + c.chunk)]))
                }
            }
            let file = try FileNode(path: path, readOnly: false)
            node = c.format == .raw ? RawNode(file: file) : file
        case .qcow2, .backend:
            var o = Qcow2CreateOptions()
            o.clusterSize = c.clusterSize
            o.lazyRefcounts = c.lazyRefcounts
            try await Qcow2Node.create(path: path, size: Int64(c.size), options: o)
            let image = try await ImageOpener.open(path)
            if c.format == .backend {
                node = BlockBackend(name: "drive0", node: BlockNode(nodeName: "n0", driver: image))
                below = image
            } else {
                node = image
            }
        }
        for t in 0..<c.tasks {
            for j in 0..<c.chunksPerTask where r.next() % 2 == 0 {
                let base = (j * c.tasks + t) * c.chunk
                let data = Op.bytes(r.next(), c.chunk)
                try await node.write(at: Int64(base), bytes: data)
                initial[t].set(base, data)
            }
        }
        if c.format.isQcow2 { try await node.flush() }

        // The race.
        let shared = Shared(below: below)
        let initialModels = initial
        let run = Task { () -> [TaskResult] in
            if c.closeAfter == 0 { startClose(node, shared, distractor: distractor) }
            return await withTaskGroup(of: (Int, TaskResult).self) { g in
                for t in 0..<c.tasks {
                    g.addTask { (t, await worker(c, t, node, initialModels[t], shared, distractor: distractor)) }
                }
                var out: [TaskResult?] = Array(repeating: nil, count: c.tasks)
                for await (t, res) in g { out[t] = res }
                return out.map { $0! }
            }
        }
        guard let results = await value(of: run, within: timeout) else {
            return ["hang: the tasks did not finish within \(timeout) s (close state \(shared.closeState.load(ordering: .sequentiallyConsistent)), \(shared.completed.load(ordering: .sequentiallyConsistent)) calls completed)"]
        }
        // Every case reaches its close point (closeAfter <= all calls); close again if not.
        startClose(node, shared, distractor: distractor)
        guard let closer = shared.closer.withLock({ $0 }), let closed = await value(of: closer, within: timeout) else {
            return ["hang: close() did not return within \(timeout) s"]
        }
        if let e = closed.error { failures.append(e) }
        for t in results { failures += t.failures }

        // Every call after close fails with .closed (and reaches no other file: the thieves
        // hold the freed descriptor numbers now).
        for (what, call) in postCloseCalls(node) {
            do {
                try await call()
                failures.append("\(what) after close() succeeded")
            } catch {
                if case .failed(let why) = classify(error) { failures.append("\(what) after close() failed with \(why)") }
            }
        }
        for f in closed.thieves { try await f.close() }

        // The image on disk: every successful write, the others old or new.
        failures += try await verifyImage(c, path: path, results: results)
        if !quiet {
            let calls = results.reduce(0) { $0 + $1.calls }, refused = results.reduce(0) { $0 + $1.closedCalls }
            print("close race: seed=\(c.seed): \(calls) calls, \(refused) refused with .closed")
        }
        return failures
    }

    static func postCloseCalls(_ node: any BlockDriver) -> [(String, @Sendable () async throws -> Void)] {
        [
            ("read", { _ = try await node.read(at: 0, count: 512) }),
            ("write", { try await node.write(at: 0, bytes: [UInt8](repeating: 1, count: 512)) }),
            ("write zeroes", { try await node.writeZeroes(at: 0, length: 512, flags: []) }),
            ("discard", { try await node.discard(at: 0, length: 65536) }),
            ("flush", { try await node.flush() }),
        ]
    }

    /// Reopens the image, compares it with the models, and runs `qemu-img check` on qcow2.
    static func verifyImage(_ c: Case, path: String, results: [TaskResult]) async throws -> [String] {
        var failures: [String] = []
        let reopened: any BlockDriver = c.format.isQcow2
            ? try await ImageOpener.open(path)
            : RawNode(file: try FileNode(path: path, readOnly: true))
        let disk = try await reopened.read(at: 0, count: c.size)
        try await reopened.close()
        for (t, res) in results.enumerated() {
            // Bytes outside the uncertain writes must match the model exactly.
            var uncertainAt = [Int: [UInt8]]()
            for u in res.uncertain {
                for (k, b) in u.bytes.enumerated() { uncertainAt[u.at + k, default: []].append(b) }
            }
            var bad = 0
            var first: String?
            for j in 0..<c.chunksPerTask {
                let base = (j * c.tasks + t) * c.chunk
                let whole = disk.withUnsafeBytes { res.model.allows(UnsafeRawBufferPointer(rebasing: $0[base..<(base + c.chunk)]), at: base) }
                if whole { continue }
                for k in base..<(base + c.chunk) {
                    let d = disk[k]
                    if res.model.allows(d, at: k) { continue }
                    if let alts = uncertainAt[k], alts.contains(d) { continue }
                    bad += 1
                    if first == nil {
                        first = "at \(k): 0x\(String(d, radix: 16)), model \(res.model.describe(k))"
                            + (uncertainAt[k].map { " or a refused write's \($0.map { "0x" + String($0, radix: 16) })" } ?? "")
                    }
                }
            }
            if bad > 0 { failures.append("reopened image: task \(t)'s bytes differ from the model in \(bad) places, first \(first!)") }
            // A refused write landed whole or not at all.
            for u in res.uncertain where !res.uncertain.contains(where: { $0.at != u.at && $0.at < u.at + u.bytes.count && u.at < $0.at + $0.bytes.count }) {
                let onDisk = Array(disk[u.at..<(u.at + u.bytes.count)])
                let new = onDisk == u.bytes
                let old = onDisk.withUnsafeBytes { res.model.allows($0, at: u.at) }
                if !new && !old {
                    let landed = onDisk.indices.filter { onDisk[$0] == u.bytes[$0] && !res.model.allows(onDisk[$0], at: u.at + $0) }
                    failures.append("reopened image: \(u.what), refused with .closed, landed in part: \(landed.count) of its bytes, "
                                    + "from \(u.at + landed.first!) to \(u.at + landed.last!)")
                }
            }
        }
        if c.format.isQcow2 {
            if Tools.qemuAvailable {
                let r = try run("qemu-img", "check", path)
                if r.status != 0 { failures.append("qemu-img check: \(r)") }
            } else {
                print("close race: qemu-img check skipped: \(Tools.qemuMissing)")
            }
        }
        return failures
    }

    // MARK: Bounded waiting

    /// Resumes a continuation once, whoever comes first.
    final class FirstOf<T: Sendable>: Sendable {
        let k = Mutex<CheckedContinuation<T?, Never>?>(nil)
        func resume(_ v: T?) { k.withLock { c -> CheckedContinuation<T?, Never>? in defer { c = nil }; return c }?.resume(returning: v) }
    }

    /// `task`'s value, or nil if it has not finished within `seconds` (the task is left running:
    /// a hang is reported, not waited for).
    static func value<T: Sendable>(of task: Task<T, Never>, within seconds: Double) async -> T? {
        let first = FirstOf<T>()
        var timer: Task<Void, Never>?
        let v: T? = await withCheckedContinuation { k in
            first.k.withLock { $0 = k }
            Task { first.resume(await task.value) }
            timer = Task {
                try? await Task.sleep(nanoseconds: UInt64(seconds * 1e9))
                first.resume(nil)
            }
        }
        timer?.cancel()
        return v
    }
}
