/// A user's handle on a node of the graph (QEMU's `BlockBackend`): what an NBD export, a
/// device model or a job holds instead of the node itself, so that the graph can switch
/// the user to another node (a live snapshot's overlay, a mirror's target) without the
/// user noticing.
///
/// Every request enters the backend, which counts it in flight and picks the node current
/// at that moment. ``drainBegin()`` holds new requests at the door and returns once the
/// ones in flight have finished; ``replaceNode(_:)`` may then switch the node, and
/// ``drainEnd()`` lets the held requests go on to the new node. Drained sections nest.
public final class BlockBackend: BlockFilter, @unchecked Sendable {
    /// The device or export name ("" for an anonymous user such as a job).
    public let name: String
    private let lock = PosixMutex()
    private var current: BlockNode
    private var inFlight = 0
    private var quiesce = 0
    private var held: [UnsafeContinuation<Void, Never>] = []
    private var drainWaiters: [UnsafeContinuation<Void, Never>] = []

    public init(name: String = "", node: BlockNode) {
        self.name = name
        self.current = node
    }

    /// The node requests go to now.
    public var node: BlockNode { lock.withLock { current } }
    /// A backend holds no content: status questions go to its current node.
    public var filteredChild: any BlockDriver { node }
    /// Requests in flight (for tests and query commands).
    public var requestsInFlight: Int { lock.withLock { inFlight } }

    /// Holds new requests and waits until every request in flight has completed.
    public func drainBegin() async {
        let done: Bool = lock.withLock {
            quiesce += 1
            return inFlight == 0
        }
        if done { return }
        await withUnsafeContinuation { (c: UnsafeContinuation<Void, Never>) in
            let now: Bool = lock.withLock {
                if inFlight == 0 { return true }
                drainWaiters.append(c)
                return false
            }
            if now { c.resume() }
        }
    }

    /// Ends a drained section; when the last one ends, held requests proceed.
    public func drainEnd() {
        let release: [UnsafeContinuation<Void, Never>] = lock.withLock {
            precondition(quiesce > 0, "drainEnd without drainBegin")
            quiesce -= 1
            guard quiesce == 0 else { return [] }
            defer { held.removeAll() }
            return held
        }
        for c in release { c.resume() }
    }

    /// Switches the backend to `new`. Call only inside a drained section, so that no
    /// request is split between the old node and the new one.
    public func replaceNode(_ new: BlockNode) {
        lock.withLock { current = new }
    }

    /// Admits one request: waits while drained, then counts it and returns the node.
    @inline(__always)
    private func enter() async -> BlockNode {
        while true {
            let node: BlockNode? = lock.withLock {
                guard quiesce == 0 else { return nil }
                inFlight += 1
                return current
            }
            if let node { return node }
            await withUnsafeContinuation { (c: UnsafeContinuation<Void, Never>) in
                let now: Bool = lock.withLock {
                    if quiesce == 0 { return true }
                    held.append(c)
                    return false
                }
                if now { c.resume() }
            }
        }
    }

    @inline(__always)
    private func leave() {
        let wake: [UnsafeContinuation<Void, Never>] = lock.withLock {
            inFlight -= 1
            guard inFlight == 0, !drainWaiters.isEmpty else { return [] }
            defer { drainWaiters.removeAll() }
            return drainWaiters
        }
        for c in wake { c.resume() }
    }

    // MARK: BlockDriver

    public var driverName: String { node.driverName }
    public var filename: String { node.filename }
    public var length: Int64 { node.length }
    public var isReadOnly: Bool { node.isReadOnly }
    public var requestAlignment: Int { node.requestAlignment }
    public var file: (any BlockDriver)? { node.file }
    public var backing: (any BlockDriver)? { node.backing }

    public func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws {
        let n = await enter()
        defer { leave() }
        try await n.read(at: offset, into: buffer)
    }

    public func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags) async throws {
        let n = await enter()
        defer { leave() }
        try await n.write(at: offset, from: buffer, flags: flags)
    }

    public func writeZeroes(at offset: Int64, length: Int64, flags: WriteFlags) async throws {
        let n = await enter()
        defer { leave() }
        try await n.writeZeroes(at: offset, length: length, flags: flags)
    }

    public func discard(at offset: Int64, length: Int64) async throws {
        let n = await enter()
        defer { leave() }
        try await n.discard(at: offset, length: length)
    }

    public func flush() async throws {
        let n = await enter()
        defer { leave() }
        try await n.flush()
    }

    public func blockStatus(at offset: Int64, length: Int64) async throws -> BlockStatus {
        let n = await enter()
        defer { leave() }
        return try await n.blockStatus(at: offset, length: length)
    }

    public func truncate(to length: Int64, preallocation: Preallocation) async throws {
        let n = await enter()
        defer { leave() }
        try await n.truncate(to: length, preallocation: preallocation)
    }

    /// A backend does not own its node: closing it only waits for its requests to end.
    /// Whoever added the node to the graph closes the node.
    public func close() async throws {
        await drainBegin()
        drainEnd()
    }
}
