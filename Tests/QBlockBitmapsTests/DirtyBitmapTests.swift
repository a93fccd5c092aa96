import Testing
import QBlock
import TestSupport
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

@Suite struct DirtyBitmapTests {
    @Test func granularityIsValidated() {
        #expect(throws: BlockError.self) { try DirtyBitmap(name: "b", size: 1 << 20, granularity: 256) }
        #expect(throws: BlockError.self) { try DirtyBitmap(name: "b", size: 1 << 20, granularity: 3000) }
    }

    @Test func marksWholeChunksAndCountsBytes() throws {
        let b = try DirtyBitmap(name: "b", size: 1_000_000, granularity: 65536)
        b.mark(offset: 65535, length: 2)
        #expect(b.dirtyBytes == 2 * 65536)
        #expect(b.nextDirtyArea(from: 0)! == (0, 131072))
        b.mark(offset: 999_999, length: 1)       // last chunk is partial: 1_000_000 - 983040
        #expect(b.dirtyBytes == 2 * 65536 + 1_000_000 - 983_040)
        b.reset(offset: 0, length: 65536)
        #expect(b.nextDirtyArea(from: 0)! == (65536, 65536))
        #expect(b.nextDirtyArea(from: 131072)! == (983_040, 1_000_000 - 983_040))
        b.isEnabled = false
        b.mark(offset: 300_000, length: 1)
        #expect(!b.isDirty(at: 300_000))
    }

    /// Differential against a Bool array, seeds printed.
    @Test(arguments: [1, 2, 3, 4, 5])
    func randomOperationsMatchModel(seed: UInt64) throws {
        var rng = SplitMix(seed: seed)
        let g: Int64 = 512 << Int64(rng.next() % 5)
        let size = Int64(rng.next() % (8 << 20)) + 1
        let b = try DirtyBitmap(name: "m", size: size, granularity: g)
        let chunks = Int((size + g - 1) / g)
        var model = [Bool](repeating: false, count: chunks)
        for _ in 0..<300 {
            let off = Int64(rng.next() % UInt64(size))
            let len = Int64(rng.next() % UInt64(min(size, 1 << 20))) + 1
            let set = rng.next() % 3 != 0
            if set { b.mark(offset: off, length: len) } else { b.reset(offset: off, length: len) }
            let end = min(size, off + len)
            for c in Int(off / g)...Int((end - 1) / g) { model[c] = set }
        }
        let expectCount = model.filter { $0 }.count
        var found = 0
        var pos: Int64 = 0
        while let (o, l) = b.nextDirtyArea(from: pos) {
            for c in Int(o / g)...Int((o + l - 1) / g) {
                #expect(model[c], "seed \(seed): chunk \(c) reported dirty")
                found += 1
            }
            pos = o + l
        }
        #expect(found == expectCount, "seed \(seed)")
        // Round trip through QEMU's serialized bit order.
        var bytes = [UInt8](repeating: 0, count: (chunks + 7) / 8)
        bytes.withUnsafeMutableBytes { b.serialize(firstChunk: 0, count: Int64(chunks), into: $0) }
        for c in 0..<chunks { #expect((bytes[c / 8] >> (c % 8)) & 1 == (model[c] ? 1 : 0)) }
        let back = try DirtyBitmap(name: "r", size: size, granularity: g)
        bytes.withUnsafeBytes { back.deserialize(firstChunk: 0, count: Int64(chunks), from: $0) }
        #expect(back.dirtyBytes == b.dirtyBytes)
        let merged = try DirtyBitmap(name: "x", size: size, granularity: 65536)
        try merged.merge(from: b)
        for c in 0..<chunks where model[c] { #expect(merged.isDirty(at: Int64(c) * g)) }
    }
}
