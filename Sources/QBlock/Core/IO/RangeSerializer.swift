/// Orders the requests of a node that read-modify-writes unaligned writes (QEMU's
/// serialising requests): a read-modify-write holds its aligned range exclusively — it waits
/// for every overlapping request in flight and every later overlapping request waits for it —
/// so no write, zeroing or discard that overlaps it is undone by its stale copy of the blocks.
/// Requests that do not overlap an exclusive one run as before, in parallel.
///
/// Waiters are served in arrival order among those that conflict, so an exclusive request is
/// not starved by a stream of shared ones.
// @unchecked: `active`, `waiting` and `nextID` are only touched with `mutex` held.
public final class RangeSerializer: @unchecked Sendable {
    /// A held range, returned by ``acquire(_:exclusive:)`` and given back to ``release(_:)``.
    public struct Token: Sendable {
        fileprivate let id: UInt64
    }

    private struct Entry {
        let id: UInt64
        let range: Range<Int64>
        let exclusive: Bool
        func conflicts(with other: Entry) -> Bool { (exclusive || other.exclusive) && range.overlaps(other.range) }
    }

    private let mutex = PosixMutex()
    private var active: [Entry] = []
    private var waiting: [(entry: Entry, resume: CheckedContinuation<Void, Never>)] = []
    private var nextID: UInt64 = 0

    /// Creates an empty serializer.
    public init() {}

    /// Waits until `range` may be used — shared (`exclusive` false: it only waits for
    /// overlapping exclusive holders) or exclusive — and holds it until ``release(_:)``.
    public func acquire(_ range: Range<Int64>, exclusive: Bool) async -> Token {
        let (entry, granted): (Entry, Bool) = mutex.withLock {
            nextID &+= 1
            let e = Entry(id: nextID, range: range, exclusive: exclusive)
            let blocked = active.contains { $0.conflicts(with: e) } || waiting.contains { $0.entry.conflicts(with: e) }
            if !blocked { active.append(e) }
            return (e, !blocked)
        }
        if granted { return Token(id: entry.id) }
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            mutex.withLock { waiting.append((entry, c)) }
            // A holder may have left between the check above and this point.
            grantWaiters()
        }
        return Token(id: entry.id)
    }

    /// Gives `token`'s range back and lets the waiters it blocked go on.
    public func release(_ token: Token) {
        mutex.withLock { active.removeAll { $0.id == token.id } }
        grantWaiters()
    }

    /// Runs `body` holding `range` (see ``acquire(_:exclusive:)``).
    public func withRange<R>(_ range: Range<Int64>, exclusive: Bool, _ body: () async throws -> R) async rethrows -> R {
        let token = await acquire(range, exclusive: exclusive)
        defer { release(token) }
        return try await body()
    }

    private func grantWaiters() {
        let ready: [CheckedContinuation<Void, Never>] = mutex.withLock {
            var go: [CheckedContinuation<Void, Never>] = []
            var still: [(entry: Entry, resume: CheckedContinuation<Void, Never>)] = []
            for w in waiting {
                if active.contains(where: { $0.conflicts(with: w.entry) }) || still.contains(where: { $0.entry.conflicts(with: w.entry) }) {
                    still.append(w)
                } else {
                    active.append(w.entry)
                    go.append(w.resume)
                }
            }
            waiting = still
            return go
        }
        for c in ready { c.resume() }
    }
}
