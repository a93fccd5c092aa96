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

/// The bitmap side file: layout, lazy write-back of cleared bits, reopening, bad files, and
/// a writer killed with SIGKILL at random moments (a child process running
/// ``writerChild()``).
@Suite(.serialized)
struct BitmapSideFileTests {
    static let writerEnv = "QBLOCK_SIDEFILE_WRITER"
    static let diskSize: Int64 = 1 << 30
    static let granularity: Int64 = 4096

    func bytes(_ path: String) throws -> [UInt8] { [UInt8](try Data(contentsOf: URL(fileURLWithPath: path))) }

    @Test func layoutAndRoundTrip() async throws {
        let dir = TempDir("side")
        let path = dir.file("b.side")
        let b = try DirtyBitmap(name: "m", size: Self.diskSize, granularity: Self.granularity)
        let f = try await BitmapSideFile.open(path: path, bitmap: b)
        var raw = try bytes(path)
        #expect(raw.count == 4096 + 32768)  // 262144 chunks = 32 KiB of bits
        #expect(Array(raw[0..<8]) == Array("QBDIRTY1".utf8))
        b.mark(offset: 9 * 4096, length: 1)           // chunk 9: byte 1, bit 1
        b.mark(offset: 40000 * 4096, length: 8192)    // chunks 40000-40001: page 1
        #expect(try await f.syncNewlyDirty() == 2)
        #expect(try await f.syncNewlyDirty() == 0)
        raw = try bytes(path)
        #expect(raw[4096 + 1] == 0x02)
        #expect(raw[4096 + 5000] == 0x03)
        try await f.close()

        let again = try DirtyBitmap(name: "m", size: Self.diskSize, granularity: Self.granularity)
        let g = try await BitmapSideFile.open(path: path, bitmap: again)
        #expect(again.dirtyBytes == 3 * 4096)
        #expect(again.isDirty(at: 9 * 4096) && again.isDirty(at: 40001 * 4096) && !again.isDirty(at: 0))
        try await g.close()
    }

    /// Cleared bits reach the file only at writeBackClean (or close); a page that gained a
    /// bit is written as the OR of file and bitmap, so it never clears one either.
    @Test func clearedBitsAreWrittenLazily() async throws {
        let dir = TempDir("side")
        let path = dir.file("b.side")
        let b = try DirtyBitmap(name: "m", size: Self.diskSize, granularity: Self.granularity)
        let f = try await BitmapSideFile.open(path: path, bitmap: b)
        b.mark(offset: 0, length: 4096)
        try await f.syncNewlyDirty()
        b.reset(offset: 0, length: 4096)
        #expect(try await f.syncNewlyDirty() == 0)
        b.mark(offset: 4096, length: 4096)
        #expect(try await f.syncNewlyDirty() == 1)
        #expect(try bytes(path)[4096] == 0x03)
        #expect(try await f.writeBackClean() == 1)
        #expect(try bytes(path)[4096] == 0x02)
        #expect(try await f.writeBackClean() == 0)
        try await f.close()
        await #expect(throws: BlockError.self) { try await f.syncNewlyDirty() }
    }

    @Test func badFilesAreRefused() async throws {
        let dir = TempDir("side")
        let path = dir.file("b.side")
        let b = try DirtyBitmap(name: "m", size: Self.diskSize, granularity: Self.granularity)
        try await BitmapSideFile.open(path: path, bitmap: b).close()
        let before = try bytes(path)
        let other = try DirtyBitmap(name: "m", size: Self.diskSize, granularity: 65536)
        await #expect(throws: BlockError.self) { _ = try await BitmapSideFile.open(path: path, bitmap: other) }
        #expect(try bytes(path) == before)
        let garbage = dir.file("g.side")
        try writeFile(garbage, at: 0, Array("not a side file".utf8))
        await #expect(throws: BlockError.self) { _ = try await BitmapSideFile.open(path: garbage, bitmap: b) }
        // A file created but never initialized (crash during creation) is initialized.
        let empty = dir.file("e.side")
        try truncateFile(empty, to: 8192)
        try await BitmapSideFile.open(path: empty, bitmap: b).close()
        #expect(Array(try bytes(empty)[0..<8]) == Array("QBDIRTY1".utf8))
    }

    /// A writer (child process) marks random chunks, syncs the side file and then logs the
    /// chunks as flushed; killed with SIGKILL at random moments, the reopened side file has
    /// every logged chunk dirty.
    @Test(arguments: [300, 700, 1200])
    func killedWriterKeepsFlushedChunks(delayMs: Int) async throws {
        var exe = [CChar](repeating: 0, count: 4096)
        let n = readlink("/proc/self/exe", &exe, exe.count - 1)
        try #require(n > 0)
        let dir = TempDir("side")
        let argv = [String(decoding: exe.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self), "--testing-library", "swift-testing", "--filter", "BitmapSideFileTests/writerChild"]
        var env = ProcessInfo.processInfo.environment
        env[Self.writerEnv] = dir.path
        let pid = try #require(Self.spawn(argv, env: env, output: dir.file("child.log")))
        // Wait until the writer runs, then let it work for a while.
        let deadline = Date().addingTimeInterval(60)
        while !FileManager.default.fileExists(atPath: dir.file("flushed.log")) && Date() < deadline { usleep(10_000) }
        usleep(useconds_t(delayMs * 1000))
        kill(pid, SIGKILL)
        _ = NBDHarness.reap(pid)
        let logged = (try String(contentsOfFile: dir.file("flushed.log"), encoding: .utf8)).split(separator: "\n")
            .compactMap { Int64($0) }
        #expect(logged.count > 10, "the writer logged too little: \((try? String(contentsOfFile: dir.file("child.log"), encoding: .utf8)) ?? "")")
        let b = try DirtyBitmap(name: "m", size: Self.diskSize, granularity: Self.granularity)
        let f = try await BitmapSideFile.open(path: dir.file("w.side"), bitmap: b)
        let missing = logged.filter { !b.isDirty(at: $0) }
        #expect(missing.isEmpty, "\(missing.count) flushed chunks lost")
        try await f.close()
    }

    /// The writer: runs only as the child of ``killedWriterKeepsFlushedChunks``.
    @Test(.enabled(if: ProcessInfo.processInfo.environment[BitmapSideFileTests.writerEnv] != nil))
    func writerChild() async throws {
        let dir = try #require(ProcessInfo.processInfo.environment[Self.writerEnv])
        let b = try DirtyBitmap(name: "m", size: Self.diskSize, granularity: Self.granularity)
        let f = try await BitmapSideFile.open(path: "\(dir)/w.side", bitmap: b)
        #expect(FileManager.default.createFile(atPath: "\(dir)/flushed.log", contents: nil))
        let log = try #require(FileHandle(forWritingAtPath: "\(dir)/flushed.log"))
        var rng = SystemRandomNumberGenerator()
        var round = 0
        while true {
            round += 1
            var written: [Int64] = []
            for _ in 0..<Int.random(in: 1...20, using: &rng) {
                // Writes in the first half; the second half is "copied" and reset.
                let chunk = Int64.random(in: 0..<(Self.diskSize / Self.granularity / 2), using: &rng)
                b.mark(offset: chunk * Self.granularity, length: Int64.random(in: 1...3 * Self.granularity, using: &rng))
                written.append(chunk * Self.granularity)
            }
            let other = Int64.random(in: (Self.diskSize / 2)..<Self.diskSize, using: &rng)
            b.mark(offset: other, length: 4096)
            try await f.syncNewlyDirty()
            try log.write(contentsOf: Data(written.map { "\($0)\n" }.joined().utf8))
            try log.synchronize()
            b.reset(offset: other, length: 4096)
            if round % 7 == 0 { try await f.writeBackClean() }
        }
    }

    static func spawn(_ argv: [String], env: [String: String], output: String) -> pid_t? {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, output, O_WRONLY | O_CREAT | O_APPEND, 0o644)
        posix_spawn_file_actions_adddup2(&actions, 1, 2)
        var cargs = argv.map { strdup($0) } + [nil]
        var cenv = env.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer {
            for a in cargs { free(a) }
            for e in cenv { free(e) }
        }
        var pid: pid_t = 0
        guard posix_spawn(&pid, argv[0], &actions, nil, &cargs, &cenv) == 0 else { return nil }
        return pid
    }
}
