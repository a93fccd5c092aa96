#if canImport(Glibc)
import Glibc
#endif
import QBlockCore

/// A user's handle on a node of the graph (QEMU's `BlockBackend`): what an NBD export, a
/// device model or a job holds instead of the node itself, so that the graph can switch
/// the user to another node (a live snapshot's overlay, a mirror's target) without the
/// user noticing.
///
/// Every request enters the backend, which counts it in flight and picks the node current
/// at that moment. ``drainBegin()`` holds new requests at the door and returns once the
/// ones in flight have finished; ``replaceNode(_:)`` may then switch the node, and
/// ``drainEnd()`` lets the held requests go on to the new node. Drained sections nest.
///
/// ``close()`` waits for the requests in flight; every request after it (including one held
/// at the door by a drained section) throws ``BlockError`` with code `.closed`.
// @unchecked Sendable: every var is only touched with `lock` held.
public final class BlockBackend: BlockFilter, @unchecked Sendable {
    /// The device or export name ("" for an anonymous user such as a job).
    public let name: String
    /// The device model using the backend, as QEMU's `qdev` names it (a QOM path), if any.
    public let qdev: String?
    private let lock = PosixMutex()
    private var current: BlockNode
    private var inFlight = 0
    private var quiesce = 0
    private var held: [UnsafeContinuation<Void, Never>] = []
    private var drainWaiters: [UnsafeContinuation<Void, Never>] = []
    private var accounting = BlockBackendStats()
    private var closed = false

    /// Creates a backend whose requests go to `node`.
    /// - Parameters:
    ///   - name: the device or export name ("" for an anonymous user such as a job).
    ///   - node: the node requests go to until ``replaceNode(_:)`` switches it.
    ///   - qdev: the QOM path of the device model using the backend, if any.
    public init(name: String = "", node: BlockNode, qdev: String? = nil) {
        self.name = name
        self.qdev = qdev
        self.current = node
    }

    /// The node requests go to now.
    public var node: BlockNode { lock.withLock { current } }
    /// A backend holds no content: status questions go to its current node.
    public var filteredChild: any BlockDriver { node }
    /// What this backend's requests have done so far (QEMU's `BlockAcctStats`).
    public var stats: BlockBackendStats { lock.withLock { accounting } }
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
    /// - Throws: the `.closed` error once the backend is closed.
    @inline(__always)
    private func enter(_ operation: String) async throws -> BlockNode {
        while true {
            let node: BlockNode? = try lock.withLock {
                if closed { throw CloseGate.closedError(name.isEmpty ? current.filename : name, operation) }
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
        leave(nil, bytes: 0, ok: true, start: 0)
    }

    /// Ends a request and accounts it (in the lock `leave` takes anyway).
    @inline(__always)
    private func leave(_ kind: BlockBackendStats.Kind?, bytes: Int64, ok: Bool, start: UInt64) {
        let now = kind == nil ? 0 : BlockBackendStats.now()
        let wake: [UnsafeContinuation<Void, Never>] = lock.withLock {
            if let kind { accounting.account(kind, bytes: bytes, ok: ok, nanoseconds: now &- start, at: now) }
            inFlight -= 1
            guard inFlight == 0, !drainWaiters.isEmpty else { return [] }
            defer { drainWaiters.removeAll() }
            return drainWaiters
        }
        for c in wake { c.resume() }
    }

    // MARK: BlockDriver

    /// The current node's driver name (`qcow2`, `raw`, …).
    public var driverName: String { node.driverName }
    /// The current node's file name.
    public var filename: String { node.filename }
    /// The current node's size as the guest sees it, in bytes.
    public var length: Int64 { node.length }
    /// Whether the current node refuses writes.
    public var isReadOnly: Bool { node.isReadOnly }
    /// The current node's request alignment, in bytes.
    public var requestAlignment: Int { node.requestAlignment }
    /// The current node's protocol child, if any.
    public var file: (any BlockDriver)? { node.file }
    /// The current node's backing image, if any.
    public var backing: (any BlockDriver)? { node.backing }

    /// Reads `buffer.count` bytes at `offset` from the current node, counted in ``stats``.
    /// Waits first while the backend is drained.
    /// - Throws: the node's error (counted as a failed read).
    public func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws {
        let start = BlockBackendStats.now()
        let n = try await enter("read")
        do { try await n.read(at: offset, into: buffer) } catch {
            leave(.read, bytes: Int64(buffer.count), ok: false, start: start)
            throw error
        }
        leave(.read, bytes: Int64(buffer.count), ok: true, start: start)
    }

    /// Writes `buffer` at `offset` to the current node, counted in ``stats``.
    /// Waits first while the backend is drained.
    /// - Throws: the node's error (counted as a failed write).
    public func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags) async throws {
        let start = BlockBackendStats.now()
        let n = try await enter("write")
        do { try await n.write(at: offset, from: buffer, flags: flags) } catch {
            leave(.write, bytes: Int64(buffer.count), ok: false, start: start)
            throw error
        }
        leave(.write, bytes: Int64(buffer.count), ok: true, start: start)
    }

    /// Makes `length` bytes at `offset` read as zeros on the current node; counted as a write.
    /// - Throws: the node's error; `.unsupported` with ``WriteFlags/noFallback`` when it cannot be done cheaply.
    public func writeZeroes(at offset: Int64, length: Int64, flags: WriteFlags) async throws {
        let start = BlockBackendStats.now()
        let n = try await enter("write zeroes")
        do { try await n.writeZeroes(at: offset, length: length, flags: flags) } catch {
            leave(.write, bytes: length, ok: false, start: start)
            throw error
        }
        leave(.write, bytes: length, ok: true, start: start)
    }

    /// Discards (unmaps) `length` bytes at `offset` on the current node; counted as an unmap.
    /// - Throws: the node's error.
    public func discard(at offset: Int64, length: Int64) async throws {
        let start = BlockBackendStats.now()
        let n = try await enter("discard")
        do { try await n.discard(at: offset, length: length) } catch {
            leave(.unmap, bytes: length, ok: false, start: start)
            throw error
        }
        leave(.unmap, bytes: length, ok: true, start: start)
    }

    /// Flushes the current node to stable storage; counted as a flush.
    /// - Throws: the node's error.
    public func flush() async throws {
        let start = BlockBackendStats.now()
        let n = try await enter("flush")
        do { try await n.flush() } catch {
            leave(.flush, bytes: 0, ok: false, start: start)
            throw error
        }
        leave(.flush, bytes: 0, ok: true, start: start)
    }

    /// The allocation status of the run starting at `offset` on the current node (not counted).
    /// - Throws: the node's error.
    public func blockStatus(at offset: Int64, length: Int64) async throws -> BlockStatus {
        let n = try await enter("block status")
        defer { leave() }
        return try await n.blockStatus(at: offset, length: length)
    }

    /// Resizes the current node to `length` bytes (QMP `block_resize`).
    /// - Throws: the node's error, e.g. `.unsupported` for a format that cannot shrink.
    public func truncate(to length: Int64, preallocation: Preallocation) async throws {
        let n = try await enter("truncate")
        defer { leave() }
        try await n.truncate(to: length, preallocation: preallocation)
    }

    /// A backend does not own its node: closing it refuses new requests and waits for the
    /// ones in flight to end. Whoever added the node to the graph closes the node.
    public func close() async throws {
        lock.withLock { closed = true }
        await drainBegin()
        drainEnd()
    }
}

/// A backend's request accounting, as QEMU's `BlockAcctStats` counts it: bytes, operations,
/// failures and total time per kind (write-zeroes count as writes, discards as unmaps),
/// and when the last request ended (`idle_time_ns`).
public struct BlockBackendStats: Sendable, Equatable {
    /// The request kinds QEMU accounts separately.
    public enum Kind: Sendable { case read, write, flush, unmap }
    /// The counters of one request kind.
    public struct PerKind: Sendable, Equatable {
        /// Bytes transferred by successful requests.
        public var bytes: Int64 = 0
        /// Requests that succeeded.
        public var operations: Int64 = 0
        /// Requests that failed.
        public var failed: Int64 = 0
        /// Time spent in successful requests, in nanoseconds.
        public var totalTimeNs: Int64 = 0
    }
    /// Reads (`rd_*` in `query-blockstats`).
    public var read = PerKind()
    /// Writes and write-zeroes (`wr_*`).
    public var write = PerKind()
    /// Flushes (`flush_*`).
    public var flush = PerKind()
    /// Discards (`unmap_*`).
    public var unmap = PerKind()
    /// CLOCK_MONOTONIC time (ns) at which the last request ended; 0 before any.
    public var lastAccessNs: UInt64 = 0

    mutating func account(_ kind: Kind, bytes: Int64, ok: Bool, nanoseconds: UInt64, at now: UInt64) {
        func add(_ k: inout PerKind) {
            if ok { k.bytes += bytes; k.operations += 1; k.totalTimeNs += Int64(clamping: nanoseconds) } else { k.failed += 1 }
        }
        switch kind {
        case .read: add(&read)
        case .write: add(&write)
        case .flush: add(&flush)
        case .unmap: add(&unmap)
        }
        lastAccessNs = now
    }

    /// CLOCK_MONOTONIC in nanoseconds.
    @inline(__always)
    public static func now() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
    }
}
