import QBlockCore
/// Whether a node is open, and the requests inside it: what lets ``BlockDriver/close()``
/// refuse new requests, wait for the ones in flight, and only then release what they use
/// (a descriptor, a socket, cached metadata).
///
/// Every node kind keeps one. A request is admitted with ``enter(_:_:)`` (or ``run(_:_:_:)``)
/// and counted until it leaves; once ``beginClose()`` has run, every call is refused with one
/// error, ``BlockError`` with code `.closed` (``closedError(_:_:)``). ``drain()`` returns when
/// the requests admitted before that have all left, so a node closes its descriptor only when
/// no request can still be using it: a request either completes before the close or fails
/// with `.closed`, and never reaches a descriptor number the kernel may have handed to
/// another file meanwhile.
///
/// Close is idempotent: ``beginClose()`` returns true once; a later or concurrent close waits
/// until the first one has finished (``finishClose()``) and then does nothing.
// @unchecked: `state`, `inFlight` and both waiter lists are only touched with `lock` held;
// continuations are resumed after it is released.
package final class CloseGate: @unchecked Sendable {
    private enum State { case open, closing, closed }
    private let lock = PosixMutex()
    private var state = State.open
    private var inFlight = 0
    private var drainWaiters: [UnsafeContinuation<Void, Never>] = []
    private var closeWaiters: [UnsafeContinuation<Void, Never>] = []

    package init() {}

    /// The one error of a call on a closed (or closing) node.
    package static func closedError(_ path: String, _ operation: String) -> BlockError {
        BlockError(.closed, "Cannot \(operation) '\(path)': the node is closed", path: path, operation: operation)
    }

    /// True until ``beginClose()`` has run.
    package var isOpen: Bool { lock.withLock { state == .open } }

    /// True once a close has begun (the node refuses every call).
    var isClosing: Bool { !isOpen }

    /// Throws the closed error unless the node is open (for calls that need no counting:
    /// they do not touch anything a close releases).
    package func check(_ path: @autoclosure () -> String, _ operation: String) throws {
        if !isOpen { throw Self.closedError(path(), operation) }
    }

    /// Admits one request, or throws the closed error. Pair with ``leave()``.
    @inline(__always)
    package func enter(_ path: @autoclosure () -> String, _ operation: String) throws {
        let admitted: Bool = lock.withLock {
            guard state == .open else { return false }
            inFlight += 1
            return true
        }
        if !admitted { throw Self.closedError(path(), operation) }
    }

    /// Admits one request if the node is open; false otherwise. Pair a true with ``leave()``.
    package func tryEnter() -> Bool {
        lock.withLock {
            guard state == .open else { return false }
            inFlight += 1
            return true
        }
    }

    /// Ends a request admitted by ``enter(_:_:)`` or ``tryEnter()``.
    @inline(__always)
    package func leave() {
        let wake: [UnsafeContinuation<Void, Never>] = lock.withLock {
            inFlight -= 1
            guard inFlight == 0, !drainWaiters.isEmpty else { return [] }
            defer { drainWaiters.removeAll() }
            return drainWaiters
        }
        for c in wake { c.resume() }
    }

    /// Runs `body` as one admitted request.
    @inline(__always)
    package func run<R>(_ path: @autoclosure () -> String, _ operation: String, _ body: () async throws -> R) async throws -> R {
        try enter(path(), operation)
        defer { leave() }
        return try await body()
    }

    /// Runs the synchronous `body` as one admitted request.
    @inline(__always)
    package func runSync<R>(_ path: @autoclosure () -> String, _ operation: String, _ body: () throws -> R) throws -> R {
        try enter(path(), operation)
        defer { leave() }
        return try body()
    }

    /// Starts closing: from now on every call is refused. Returns true for the first close;
    /// a later one waits until the first has finished, then returns false (nothing to do).
    package func beginClose() async -> Bool {
        let first: Bool? = lock.withLock {
            switch state {
            case .open: state = .closing; return true
            case .closed: return false
            case .closing: return nil
            }
        }
        if let first { return first }
        await withUnsafeContinuation { (c: UnsafeContinuation<Void, Never>) in
            let done: Bool = lock.withLock {
                if state == .closed { return true }
                closeWaiters.append(c)
                return false
            }
            if done { c.resume() }
        }
        return false
    }

    /// Waits until every request admitted before ``beginClose()`` has left.
    package func drain() async {
        if lock.withLock({ inFlight == 0 }) { return }
        await withUnsafeContinuation { (c: UnsafeContinuation<Void, Never>) in
            let now: Bool = lock.withLock {
                if inFlight == 0 { return true }
                drainWaiters.append(c)
                return false
            }
            if now { c.resume() }
        }
    }

    /// Ends the close ``beginClose()`` began, releasing concurrent closers.
    package func finishClose() {
        let wake: [UnsafeContinuation<Void, Never>] = lock.withLock {
            state = .closed
            defer { closeWaiters.removeAll() }
            return closeWaiters
        }
        for c in wake { c.resume() }
    }
}
