#if canImport(Glibc)
import Glibc
#endif
import Foundation
import QBlockCore
import QBlockNBDWire

/// An NBD server (the NBD project's `doc/proto.md`, fixed newstyle negotiation with
/// structured replies and metadata contexts) exporting nodes of the graph, like qemu-nbd
/// or QEMU's `nbd-server-start` / `block-export-add`.
///
/// ```swift
/// let node = try await ImageOpener.open("disk.qcow2")
/// let server = NBDServer(exports: [try NBDExport(name: "disk", node: node)])
/// try server.listen(unix: "/tmp/nbd.sock")
/// try await server.run()          // until shutdown(), or the last client leaves
/// try await node.close()
/// ```
///
/// Each listening socket has an acceptor thread and each client a reader and a writer
/// thread (`NBDConnection`): blocking socket calls never run on Swift's cooperative
/// pool. Commands run as tasks against the export's node, several at once per client.
/// The server never closes the nodes it exports.
// @unchecked: `state`, exports, listeners, connections, counters and wake descriptors are only touched
// with `condition` held; `options` is immutable, `finished` is thread-safe.
public final class NBDServer: @unchecked Sendable {
    /// How the server as a whole behaves (qemu-nbd's `-e` and `-t`).
    public struct Options: Sendable {
        /// Clients served at once (qemu-nbd `-e`); more wait in the listen backlog.
        public var maxClients: Int
        /// Keep running when the last client disconnects (qemu-nbd `-t`).
        public var persistent: Bool

        /// Creates options; `maxClients` below 1 is taken as 1.
        public init(maxClients: Int = 1, persistent: Bool = true) {
            self.maxClients = max(1, maxClients)
            self.persistent = persistent
        }
    }

    /// Where a listener listens.
    public enum Address: Sendable, Equatable, CustomStringConvertible {
        /// A Unix domain socket at `path`.
        case unix(path: String)
        /// A TCP socket on `host` (a name or address) and `port`; port 0 picks a free port.
        case tcp(host: String, port: UInt16)

        public var description: String {
            switch self {
            case .unix(let p): return "unix:\(p)"
            case .tcp(let h, let p): return h.contains(":") ? "[\(h)]:\(p)" : "\(h):\(p)"
            }
        }
    }

    private enum State { case idle, running, stopping, stopped }

    private struct Listener {
        let fd: Int32
        let address: Address
    }

    /// The options the server was created with.
    public let options: Options
    private let condition = NSCondition()
    private var state = State.idle
    private var exports: [NBDExport] = []
    private var listeners: [Listener] = []
    private var connections: [Int: NBDConnection] = [:]
    private var nextID = 0
    private var acceptorsRunning = 0
    private var wakeRead: Int32 = -1
    private var wakeWrite: Int32 = -1
    private let finished = AsyncEvent()

    /// - Parameters:
    ///   - exports: the exports offered; names must be distinct.
    ///   - options: client limit and persistence.
    public init(exports: [NBDExport] = [], options: Options = Options()) {
        self.options = options
        var seen = Set<String>()
        for e in exports where seen.insert(e.name).inserted { self.exports.append(e) }
    }

    deinit {
        for l in listeners { SocketCalls.close(l.fd) }
        if wakeRead >= 0 { SocketCalls.close(wakeRead) }
        if wakeWrite >= 0 { SocketCalls.close(wakeWrite) }
    }

    // MARK: - Exports

    /// Adds an export; clients that connect from now on see it.
    /// - Throws: ``BlockError`` `.busy` if an export of that name exists.
    public func addExport(_ export: NBDExport) throws {
        try condition.withLock {
            if exports.contains(where: { $0.name == export.name }) {
                throw BlockError(.busy, "Block export id '\(export.name)' is already in use", operation: "add export")
            }
            exports.append(export)
        }
    }

    /// Removes an export from the list new clients see (clients using it keep it).
    /// - Throws: ``BlockError`` `.notFound` if there is none of that name.
    public func removeExport(named name: String) throws {
        _ = try removeExport(named: name, force: true)
    }

    /// The names of the exports new clients can choose, in the order NBD_OPT_LIST lists them.
    public var exportNames: [String] { condition.withLock { exports.map(\.name) } }

    /// Makes `c` a client of `export` if the export is still offered. Under the server's lock,
    /// so that a removal sees either the client or no export.
    func attach(_ c: NBDConnection, to export: NBDExport) -> Bool {
        condition.withLock {
            guard exports.contains(where: { $0 === export }) else { return false }
            c.export = export
            return true
        }
    }

    /// Removes export `name` from the list unless clients use it and `force` is false;
    /// returns how many clients it has (their connections keep it until they end).
    /// - Throws: ``BlockError`` `.notFound` if there is none of that name, `.busy` if it has
    ///   clients and `force` is false.
    public func removeExport(named name: String, force: Bool) throws -> Int {
        try condition.withLock {
            guard let i = exports.firstIndex(where: { $0.name == name }) else {
                throw BlockError(.notFound, "Export '\(name)' is not found", operation: "remove export")
            }
            let users = connections.values.filter { $0.exportName == name }.count
            if users > 0 && !force {
                throw BlockError(.busy, "export '\(name)' still in use", operation: "remove export")
            }
            exports.remove(at: i)
            return users
        }
    }

    /// Clients connected now.
    public var clientCount: Int { condition.withLock { connections.count } }

    /// Clients whose handshake chose export `name` and that are still connected.
    public func clientCount(export name: String) -> Int {
        condition.withLock { connections.values.filter { $0.exportName == name }.count }
    }

    /// Disconnects every client of export `name` (`block-export-del` in hard mode).
    public func disconnectClients(export name: String) {
        let users = condition.withLock { connections.values.filter { $0.exportName == name } }
        for c in users { c.abort() }
    }

    /// Returns once no client of export `name` is connected.
    public func waitForClients(export name: String) async {
        await IOThreadPool.shared.run { [self] in
            condition.lock()
            while connections.values.contains(where: { $0.exportName == name }) { condition.wait() }
            condition.unlock()
        }
    }

    // MARK: - Listening

    /// Listens on a Unix-domain socket at `path` (replacing a stale socket file there).
    /// - Throws: ``BlockError`` from `socket`/`bind`/`listen`.
    @discardableResult
    public func listen(unix path: String) throws -> Address {
        switch SocketCalls.listenUnix(path: path, backlog: 16) {
        case .success(let fd):
            let a = Address.unix(path: path)
            try add(Listener(fd: fd, address: a))
            return a
        case .failure(let e):
            throw BlockError.system(e.rawValue, "listen", path: path).with(operation: "listen")
                .withMessage("Failed to bind socket to \(path): \(BlockError.strerror(e.rawValue))")
        }
    }

    /// Listens on TCP `host`:`port` (port 0 picks a free port).
    /// - Returns: the address actually bound (with the port chosen).
    /// - Throws: ``BlockError`` from name resolution, `bind` or `listen`.
    @discardableResult
    public func listen(host: String, port: UInt16) throws -> Address {
        switch SocketCalls.listenTCP(host: host, port: port, backlog: 16) {
        case .success(let (fd, bound)):
            let a = Address.tcp(host: host, port: bound)
            try add(Listener(fd: fd, address: a))
            return a
        case .failure(let e):
            throw BlockError.system(e.rawValue, "listen")
                .withMessage("Failed to bind socket to \(host):\(port): \(BlockError.strerror(e.rawValue))")
        }
    }

    /// The addresses listened on.
    public var addresses: [Address] { condition.withLock { listeners.map(\.address) } }

    private func add(_ l: Listener) throws {
        let ok: Bool = condition.withLock {
            guard state == .idle || state == .running else { return false }
            listeners.append(l)
            return true
        }
        if !ok {
            SocketCalls.close(l.fd)
            throw BlockError(.closed, "The NBD server has been shut down", operation: "listen")
        }
        if condition.withLock({ state == .running }) { startAcceptor(l) }
    }

    // MARK: - Running

    /// Starts accepting clients on the listening sockets, from dedicated threads, without
    /// waiting (``run()`` calls it if it was not called; calling it first means clients are
    /// served even before the task that awaits ``run()`` is scheduled).
    /// - Throws: ``BlockError`` if there is nothing to listen on or the server was shut down.
    public func start() throws {
        let toStart: [Listener] = try condition.withLock {
            if state == .running { return [] }
            guard state == .idle else { throw BlockError(.closed, "The NBD server has been shut down", operation: "start") }
            guard !listeners.isEmpty else { throw BlockError(.invalidArgument, "The NBD server listens nowhere", operation: "start") }
            guard case .success(let (r, w)) = SocketCalls.pipe() else { throw BlockError(.io, "Cannot create a pipe", operation: "start") }
            wakeRead = r
            wakeWrite = w
            state = .running
            return listeners
        }
        for l in toStart { startAcceptor(l) }
    }

    /// Serves clients until ``shutdown()`` — or, without ``Options/persistent``, until the
    /// last client disconnects after at least one came. Starts the server if needed.
    /// - Throws: ``BlockError`` if there is nothing to listen on or the server was shut down.
    public func run() async throws {
        try start()
        await finished.wait()
        await stop()
    }

    /// Stops accepting, disconnects every client, waits for their requests to finish and
    /// closes the listening sockets (removing Unix socket files). Idempotent.
    public func shutdown() async {
        let wasRunning: Bool = condition.withLock {
            switch state {
            case .idle:
                state = .stopped
                return false
            case .running:
                return true
            case .stopping, .stopped:
                return true
            }
        }
        if wasRunning {
            finished.signal()
            await stop()
        } else {
            closeListeners()
        }
    }

    private func stop() async {
        let conns: [NBDConnection] = condition.withLock {
            if state == .running { state = .stopping }
            condition.broadcast()
            return Array(connections.values)
        }
        if wakeWrite >= 0 { _ = withUnsafeBytes(of: UInt8(1)) { Glibc.write(wakeWrite, $0.baseAddress, 1) } }
        for c in conns { c.abort() }
        // Wait on a pool thread (not the cooperative pool) for acceptors and clients to end.
        await IOThreadPool.shared.run { [self] in
            condition.lock()
            while acceptorsRunning > 0 || !connections.isEmpty { condition.wait() }
            state = .stopped
            condition.unlock()
        }
        closeListeners()
    }

    private func closeListeners() {
        let ls: [Listener] = condition.withLock {
            let l = listeners
            listeners = []
            return l
        }
        for l in ls {
            SocketCalls.close(l.fd)
            if case .unix(let path) = l.address { unlink(path) }
        }
    }

    private func startAcceptor(_ l: Listener) {
        condition.withLock { acceptorsRunning += 1 }
        let t = Thread { [self] in
            self.acceptLoop(l)
            condition.withLock {
                acceptorsRunning -= 1
                condition.broadcast()
            }
        }
        t.name = "qblock-nbd-accept"
        t.stackSize = 256 * 1024
        t.start()
    }

    private func acceptLoop(_ l: Listener) {
        while true {
            // Wait for a free client slot (qemu-nbd stops polling the socket when full).
            condition.lock()
            while state == .running && connections.count >= options.maxClients { condition.wait() }
            let running = state == .running
            condition.unlock()
            guard running else { return }
            switch SocketCalls.waitReadable(l.fd, wakeFD: wakeRead) {
            case .success(true): break
            case .success(false), .failure: return
            }
            let fd: Int32
            switch SocketCalls.accept(l.fd) {
            case .success(let c): fd = c
            case .failure(let e) where e.rawValue == EAGAIN || e.rawValue == EMFILE || e.rawValue == ENFILE || e.rawValue == ENOBUFS || e.rawValue == ENOMEM:
                usleep(10_000)
                continue
            case .failure:
                return
            }
            let conn: NBDConnection? = condition.withLock {
                guard state == .running else { return nil }
                nextID += 1
                let c = NBDConnection(id: nextID, fd: fd, server: self, exports: exports)
                connections[nextID] = c
                return c
            }
            guard let conn else {
                SocketCalls.close(fd)
                return
            }
            conn.start()
        }
    }

    /// Called by a connection's reader thread when it has closed its socket. Without
    /// ``Options/persistent`` the server stops when the last client goes and that client had
    /// reached the transmission phase, as qemu-nbd: a client that only listed the exports
    /// (`qemu-nbd --list`, `nbdinfo --list`) or gave up in the handshake does not stop it.
    func connectionEnded(_ c: NBDConnection) {
        let negotiated = c.transmission != nil
        let last: Bool = condition.withLock {
            connections[c.id] = nil
            condition.broadcast()
            return connections.isEmpty && negotiated && !options.persistent && state == .running
        }
        if last { finished.signal() }
    }
}

extension BlockError {
    package func withMessage(_ m: String) -> BlockError {
        var e = self
        e.message = m
        return e
    }
}
