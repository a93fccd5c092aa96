import QBlockCore
/// Serializes requests on overlapping byte ranges (QEMU's serialising requests): a
/// copy-on-read of a cluster and a write to it never interleave, and a read of a cluster
/// being copied waits for the copy.
// @unchecked: `held`, `waiters` and `nextID` are only touched with `lock` held.
public final class RangeLock: @unchecked Sendable {
    private let lock = PosixMutex()
    private var held: [(id: UInt64, start: Int64, end: Int64)] = []
    private var waiters: [UnsafeContinuation<Void, Never>] = []
    private var nextID: UInt64 = 0

    /// Creates a lock with no range held.
    public init() {}

    /// A held range; pass it to ``release(_:)``.
    public struct Token: Sendable { let id: UInt64 }

    /// Waits until no held range overlaps `[start, end)`, then holds it.
    public func acquire(_ start: Int64, _ end: Int64) async -> Token {
        func overlaps() -> Bool { held.contains { $0.start < end && start < $0.end } }
        while true {
            let token: Token? = lock.withLock {
                if overlaps() { return nil }
                nextID += 1
                held.append((nextID, start, end))
                return Token(id: nextID)
            }
            if let token { return token }
            // Park until some range is released, then look again.
            await withUnsafeContinuation { (c: UnsafeContinuation<Void, Never>) in
                let parked: Bool = lock.withLock {
                    if overlaps() { waiters.append(c); return true }
                    return false
                }
                if !parked { c.resume() }
            }
        }
    }

    /// Releases a range and lets waiters look again.
    public func release(_ token: Token) {
        let wake: [UnsafeContinuation<Void, Never>] = lock.withLock {
            held.removeAll { $0.id == token.id }
            let w = waiters
            waiters = []
            return w
        }
        for w in wake { w.resume() }
    }

    /// Runs `body` holding `[start, end)`.
    public func withRange<R>(_ start: Int64, _ end: Int64, _ body: () async throws -> R) async rethrows -> R {
        let t = await acquire(start, end)
        defer { release(t) }
        return try await body()
    }
}
