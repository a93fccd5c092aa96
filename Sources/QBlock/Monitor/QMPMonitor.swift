#if canImport(Glibc)
import Glibc
#endif
import QBlockCore
import QBlockGraph

/// A QMP monitor: QEMU's machine protocol (`docs/interop/qmp-spec.txt`) over the block
/// graph. It owns the command table and the event fan-out; ``QMPServer`` carries it over
/// Unix sockets, and ``execute(_:arguments:)`` calls it in process.
///
/// Commands are added by name from any file (a command group is one extension with a
/// `register…Commands()` method, listed in `QMPCommandGroups.swift`):
///
/// ```swift
/// monitor.register("query-foo") { args, ctx in
///     let name = try args.string("name")      // QEMU's missing / type errors
///     try args.done()                          // "Parameter 'x' is unexpected"
///     guard let node = ctx.graph.node(named: name) else { throw QMPError.noDevice(device: name, node: name) }
///     ctx.emit(event: "FOO", data: QObject.Dict([("node", .string(node.nodeName))]))
///     return .dict(QObject.Dict())
/// }
/// ```
///
/// Commands run one at a time across all clients (QEMU's big lock), except those registered
/// with `exclusive: false` (queries, `quit`): a handler must not wait for anything long;
/// long operations (jobs) start a task and return. Events go to every
/// client that has negotiated capabilities, and to in-process ``subscribe()`` streams.
// @unchecked: handlers, sessions, subscribers, `nextID`, `quitHandler` and `state` are only touched
// with `lock` held; commands are serialized by `commandLock`; the lets are immutable or thread-safe.
public final class QMPMonitor: @unchecked Sendable {
    /// A command: its arguments (read them, then call ``QMPArguments/done()``) and the
    /// context; returns the `return` value (`.dict(QObject.Dict())` for `{}`).
    public typealias Handler = @Sendable (QMPArguments, QMPContext) async throws -> QObject

    /// The block graph the commands operate on.
    public let graph: BlockGraph
    /// What `query-version` reports, fixed at ``init(graph:version:)``.
    public let version: QMPVersion

    private let lock = PosixMutex()
    private var handlers: [String: Handler] = [:]
    private var order: [String] = []
    private var concurrent = Set<String>()
    private var sessions: [Int: QMPSession] = [:]
    private var subscribers: [Int: AsyncStream<QObject>.Continuation] = [:]
    private var nextID = 0
    private var quitHandler: (@Sendable () -> Void)?
    private var state: [ObjectIdentifier: AnyObject] = [:]
    /// Serializes command execution (QEMU's BQL for the monitor).
    let commandLock = AsyncMutex()

    /// A monitor over `graph` with every standard command group registered.
    /// - Parameters:
    ///   - graph: the block graph the commands operate on.
    ///   - version: what `query-version` reports; by default QEMU 7.2, whose protocol the
    ///     monitor speaks.
    public init(graph: BlockGraph = BlockGraph(), version: QMPVersion = .qemu72) {
        self.graph = graph
        self.version = version
        for install in QMPMonitor.standardGroups { install(self) }
        DriveOpener.installJSONFilenames()
    }

    // MARK: - Commands

    /// Adds (or replaces) command `name`.
    /// - Parameter exclusive: false for commands that only read thread-safe state (queries):
    ///   they run at once, even while another client's command holds the monitor.
    public func register(_ name: String, exclusive: Bool = true, handler: @escaping Handler) {
        lock.withLock {
            if handlers[name] == nil { order.append(name) }
            handlers[name] = handler
            if exclusive { concurrent.remove(name) } else { concurrent.insert(name) }
        }
    }

    func isExclusive(_ name: String) -> Bool { lock.withLock { !concurrent.contains(name) } }

    /// The registered command names, in registration order.
    public var commandNames: [String] { lock.withLock { order } }

    func handler(_ name: String) -> Handler? { lock.withLock { handlers[name] } }

    /// Per-monitor state a command group keeps (NBD server, exports, ...): created on first
    /// use with `make`, one instance per type.
    public func state<T: AnyObject>(_ type: T.Type, make: () -> T) -> T {
        lock.withLock {
            if let s = state[ObjectIdentifier(type)] as? T { return s }
            let s = make()
            state[ObjectIdentifier(type)] = s
            return s
        }
    }

    /// Called once after a `quit` command has been answered (the daemon shuts down).
    public func onQuit(_ handler: @escaping @Sendable () -> Void) { lock.withLock { quitHandler = handler } }

    func requestQuit() {
        let h: (@Sendable () -> Void)? = lock.withLock { let h = quitHandler; quitHandler = nil; return h }
        h?()
    }

    /// Runs command `name` in process, as if a negotiated client had sent it.
    /// - Returns: the `return` value.
    /// - Throws: ``QMPError``.
    @discardableResult
    public func execute(_ name: String, arguments: QObject.Dict = QObject.Dict()) async throws -> QObject {
        guard let h = handler(name), name != "qmp_capabilities" else {
            throw QMPError(.commandNotFound, "The command \(name) has not been found")
        }
        let ctx = QMPContext(monitor: self, session: nil)
        let exclusive = isExclusive(name)
        if exclusive { await commandLock.lock() }
        defer { if exclusive { commandLock.unlock() } }
        do {
            return try await h(QMPArguments(arguments), ctx)
        } catch {
            throw QMPError.from(error)
        }
    }

    // MARK: - Events

    /// Sends event `event` with `data` and the current time to every negotiated client and
    /// subscriber: `{"timestamp": {"seconds": s, "microseconds": us}, "event": …, "data": …}`.
    public func emit(event: String, data: QObject.Dict? = nil) {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        var d = QObject.Dict()
        d["timestamp"] = .dict(QObject.Dict([("seconds", .int(Int64(ts.tv_sec))), ("microseconds", .int(Int64(ts.tv_nsec / 1000)))]))
        d["event"] = .string(event)
        if let data { d["data"] = .dict(data) }
        let message = QObject.dict(d)
        let (targets, subs) = lock.withLock { (Array(sessions.values), Array(subscribers.values)) }
        for s in targets where s.negotiated { s.send(message) }
        for c in subs { c.yield(message) }
    }

    /// A stream of every event emitted from now on (for in-process users and tests).
    public func subscribe() -> AsyncStream<QObject> {
        let (stream, continuation) = AsyncStream<QObject>.makeStream(bufferingPolicy: .bufferingNewest(4096))
        let id: Int = lock.withLock { nextID += 1; subscribers[nextID] = continuation; return nextID }
        continuation.onTermination = { [weak self] _ in self?.lock.withLock { _ = self?.subscribers.removeValue(forKey: id) } }
        return stream
    }

    // MARK: - Sessions

    /// A new client session whose replies and events go to `send`.
    func openSession(send: @escaping @Sendable (QObject) -> Void) -> QMPSession {
        lock.withLock {
            nextID += 1
            let s = QMPSession(id: nextID, send: send)
            sessions[nextID] = s
            return s
        }
    }

    func closeSession(_ s: QMPSession) { lock.withLock { _ = sessions.removeValue(forKey: s.id) } }

    /// The greeting sent on connect.
    var greeting: QObject {
        .dict(QObject.Dict([("QMP", .dict(QObject.Dict([("version", versionObject), ("capabilities", .list([]))])))]))
    }

    var versionObject: QObject {
        let q = QObject.Dict([("major", .int(Int64(version.major))), ("minor", .int(Int64(version.minor))),
                              ("micro", .int(Int64(version.micro)))])
        return .dict(QObject.Dict([("qemu", .dict(q)), ("package", .string(version.package))]))
    }

    /// Handles one message of a session (or an input error) and returns the reply.
    func handle(_ input: QMPStreamer.Output, session: QMPSession) async -> QObject {
        switch input {
        case .error(let text):
            return QMPMonitor.reply(error: .generic(text), id: nil)
        case .message(let m):
            return await dispatch(m, session: session)
        }
    }

    private func dispatch(_ message: QObject, session: QMPSession) async -> QObject {
        guard case .dict(let req) = message else {
            return QMPMonitor.reply(error: .generic("QMP input must be a JSON object"), id: nil)
        }
        let id = req["id"]
        var name: String?
        var arguments = QObject.Dict()
        for e in req.qemuOrdered {
            switch e.key {
            case "execute":
                guard case .string(let s) = e.value else {
                    return QMPMonitor.reply(error: .generic("QMP input member 'execute' must be a string"), id: id)
                }
                name = s
            case "arguments":
                guard case .dict(let d) = e.value else {
                    return QMPMonitor.reply(error: .generic("QMP input member 'arguments' must be an object"), id: id)
                }
                arguments = d
            case "id":
                break
            default:
                return QMPMonitor.reply(error: .generic("QMP input member '\(e.key)' is unexpected"), id: id)
            }
        }
        guard let name else { return QMPMonitor.reply(error: .generic("QMP input lacks member 'execute'"), id: id) }
        if !session.negotiated {
            guard name == "qmp_capabilities" else {
                return QMPMonitor.reply(error: QMPError(.commandNotFound, "Expecting capabilities negotiation with 'qmp_capabilities'"), id: id)
            }
            let args = QMPArguments(arguments)
            do {
                if let enable = try args.optionalList("enable") {
                    for cap in enable {
                        guard case .string(let c) = cap else {
                            throw QMPError.generic("Invalid parameter type for 'enable', expected: string")
                        }
                        if c == "oob" { throw QMPError.generic("Capability 'oob' not available") }
                        throw QMPError.generic("Parameter 'enable' does not accept value '\(c)'")
                    }
                }
                try args.done()
            } catch {
                return QMPMonitor.reply(error: QMPError.from(error), id: id)
            }
            session.negotiated = true
            return QMPMonitor.reply(return: .dict(QObject.Dict()), id: id)
        }
        if name == "qmp_capabilities" {
            return QMPMonitor.reply(error: QMPError(.commandNotFound, "Capabilities negotiation is already complete, command ignored"), id: id)
        }
        guard let h = handler(name) else {
            return QMPMonitor.reply(error: QMPError(.commandNotFound, "The command \(name) has not been found"), id: id)
        }
        let ctx = QMPContext(monitor: self, session: session)
        let exclusive = isExclusive(name)
        if exclusive { await commandLock.lock() }
        defer { if exclusive { commandLock.unlock() } }
        do {
            let r = try await h(QMPArguments(arguments), ctx)
            if name == "quit" { session.quitAfterReply = true }
            return QMPMonitor.reply(return: r, id: id)
        } catch {
            return QMPMonitor.reply(error: QMPError.from(error), id: id)
        }
    }

    static func reply(return value: QObject, id: QObject?) -> QObject {
        var d = QObject.Dict([("return", value)])
        if let id { d["id"] = id }
        return .dict(d)
    }

    static func reply(error: QMPError, id: QObject?) -> QObject {
        var d = QObject.Dict()
        if let id { d["id"] = id }
        d["error"] = error.qobject
        return .dict(d)
    }
}

/// One client's state: whether it has negotiated capabilities, and where its output goes.
// @unchecked: `_negotiated` and `_quit` are only touched with `lock` held; `id` and `send` are
// immutable.
final class QMPSession: @unchecked Sendable {
    let id: Int
    let send: @Sendable (QObject) -> Void
    private let lock = PosixMutex()
    private var _negotiated = false
    private var _quit = false

    init(id: Int, send: @escaping @Sendable (QObject) -> Void) {
        self.id = id
        self.send = send
    }

    var negotiated: Bool {
        get { lock.withLock { _negotiated } }
        set { lock.withLock { _negotiated = newValue } }
    }

    /// Set when this session's last command was `quit`.
    var quitAfterReply: Bool {
        get { lock.withLock { _quit } }
        set { lock.withLock { _quit = newValue } }
    }
}

/// What a command handler works with: the monitor (events, per-monitor state), the graph.
public struct QMPContext: Sendable {
    /// The monitor running the command.
    public let monitor: QMPMonitor
    let session: QMPSession?

    /// The block graph.
    public var graph: BlockGraph { monitor.graph }

    /// Emits an event to every client (see ``QMPMonitor/emit(event:data:)``).
    public func emit(event: String, data: QObject.Dict? = nil) { monitor.emit(event: event, data: data) }
}

/// What `query-version` reports: a QEMU version and a package string.
public struct QMPVersion: Sendable, Hashable {
    /// The QEMU major version (`qemu.major`).
    public var major: Int
    /// The QEMU minor version (`qemu.minor`).
    public var minor: Int
    /// The QEMU micro version (`qemu.micro`).
    public var micro: Int
    /// The package string (`package`).
    public var package: String

    /// Creates a version; every parameter is the property of the same name.
    public init(major: Int, minor: Int, micro: Int, package: String) {
        self.major = major
        self.minor = minor
        self.micro = micro
        self.package = package
    }

    /// QEMU 7.2.0, package "qblock": the protocol the monitor speaks.
    public static let qemu72 = QMPVersion(major: 7, minor: 2, micro: 0, package: "qblock")
}
