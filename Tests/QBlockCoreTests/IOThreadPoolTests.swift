import Foundation
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

@Suite struct IOThreadPoolTests {
    /// A job that blocks must not hold up jobs submitted right after it, even when one idle
    /// thread was about to take both.
    @Test func blockedJobDoesNotDelayOthers() async throws {
        let pool = IOThreadPool(maxThreads: 8)
        _ = await pool.run { 0 }   // one thread exists and goes idle
        let gate = DispatchSemaphore(value: 0)
        // Releases the blocked job after 3 s in any case, so a regression fails instead of hanging.
        DispatchQueue.global().asyncAfter(deadline: .now() + 3) { gate.signal() }
        let blocked = Task { await pool.run { gate.wait(); return 1 } }
        await Task.yield()
        let start = ContinuousClock.now
        let quick = await pool.run { 2 }
        let waited = start.duration(to: .now)
        gate.signal()
        #expect(quick == 2)
        #expect(await blocked.value == 1)
        #expect(waited < .seconds(2), "a quick job waited \(waited) behind a blocked one")
    }

    @Test func manyConcurrentJobsAllComplete() async {
        let pool = IOThreadPool(maxThreads: 4)
        let total = await withTaskGroup(of: Int.self) { g in
            for i in 0..<500 { g.addTask { await pool.run { i } } }
            return await g.reduce(0, +)
        }
        #expect(total == 500 * 499 / 2)
    }
}
