#if canImport(Glibc)
import Glibc
#endif
import QBlockCore
import QBlockJobs

/// `object-add` / `object-del` (QEMU 7.2's `qapi/qom.json`) for the user-creatable objects
/// a storage daemon uses, and `query-iothreads`:
///
/// - `secret`: `data` or `file`, `format` raw/base64; the bytes are kept for the commands
///   that will take a secret (``QMPObjects/secret(_:)``). Encrypted secrets (`keyid`, `iv`)
///   are refused.
/// - `iothread`: recorded with its polling parameters and listed by `query-iothreads`. No
///   node or export can be bound to an iothread here (no command takes an `iothread`
///   argument), so recording them changes nothing; the daemon's I/O runs on its own pool.
/// - `throttle-group`, `tls-creds-*` and every other type: refused with an error rather
///   than accepted without effect.
extension QMPMonitor {
    /// The user-created objects.
    public var objects: QMPObjects { state(QMPObjects.self) { QMPObjects() } }

    /// QAPI's `ObjectType` (QEMU 7.2): the values `qom-type` accepts.
    static let objectTypeNames = [
        "authz-list", "authz-listfile", "authz-pam", "authz-simple", "can-bus", "can-host-socketcan", "colo-compare",
        "cryptodev-backend", "cryptodev-backend-builtin", "cryptodev-backend-lkcf", "cryptodev-vhost-user", "dbus-vmstate",
        "filter-buffer", "filter-dump", "filter-mirror", "filter-redirector", "filter-replay", "filter-rewriter",
        "input-barrier", "input-linux", "iothread", "main-loop", "memory-backend-epc", "memory-backend-file",
        "memory-backend-memfd", "memory-backend-ram", "pef-guest", "pr-manager-helper", "qtest", "rng-builtin",
        "rng-egd", "rng-random", "secret", "secret_keyring", "sev-guest", "thread-context", "s390-pv-guest",
        "throttle-group", "tls-creds-anon", "tls-creds-psk", "tls-creds-x509", "tls-cipher-suites", "x-remote-object",
        "x-vfio-user-server",
    ]

    func registerObjectCommands() {
        register("object-add") { args, ctx in
            let type = try args.enumValue("qom-type", QMPMonitor.objectTypeNames)
            let id = try args.string("id")
            let objects = ctx.monitor.objects
            let object = try QMPObjects.make(type: type, id: id, args, checkingAgainst: objects)
            objects.add(id, object)
            return .dict(QObject.Dict())
        }
        register("object-del") { args, ctx in
            let id = try args.string("id")
            try args.done()
            guard ctx.monitor.objects.remove(id) else { throw QMPError.generic("object '\(id)' not found") }
            return .dict(QObject.Dict())
        }
        register("query-iothreads", exclusive: false) { args, ctx in
            try args.done()
            return .list(ctx.monitor.objects.iothreads.map { t in
                .dict(QObject.Dict([("id", .string(t.id)), ("thread-id", .int(Int64(getpid()))),
                                    ("poll-max-ns", .int(t.pollMaxNs)), ("poll-grow", .int(t.pollGrow)),
                                    ("poll-shrink", .int(t.pollShrink)), ("aio-max-batch", .int(t.aioMaxBatch))]))
            })
        }
    }
}

/// The monitor's user-created objects (QEMU's `/objects` container), by id.
// @unchecked: `objects` is only touched with `lock` held.
public final class QMPObjects: @unchecked Sendable {
    // @unchecked: every stored property is guarded by `lock`.
    /// An iothread object's properties.
    public struct IOThread: Sendable {
        /// The object's id (`object-add`'s `id`).
        public var id: String
        /// Polling properties (`poll-max-ns`, `poll-grow`, `poll-shrink`); recorded and reported, not acted on.
        public var pollMaxNs: Int64 = 32768, pollGrow: Int64 = 0, pollShrink: Int64 = 0
        /// Batching and thread-pool properties (`aio-max-batch`, `thread-pool-min`, `thread-pool-max`); recorded and reported, not acted on.
        public var aioMaxBatch: Int64 = 0, threadPoolMin: Int64 = 0, threadPoolMax: Int64 = 64
    }

    enum Object {
        case secret([UInt8])
        case iothread(IOThread)
    }

    private let lock = PosixMutex()
    private var objects: [(id: String, object: Object)] = []

    init() {}

    /// The bytes of secret `id`, nil if there is no such secret.
    public func secret(_ id: String) -> [UInt8]? {
        lock.withLock {
            if case .secret(let b)? = objects.first(where: { $0.id == id })?.object { return b }
            return nil
        }
    }

    /// The iothreads, oldest first.
    public var iothreads: [IOThread] {
        lock.withLock { objects.compactMap { if case .iothread(let t) = $0.object { return t } else { return nil } } }
    }

    func checkFree(_ id: String) throws {
        if lock.withLock({ objects.contains { $0.id == id } }) {
            throw QMPError.generic("attempt to add duplicate property '\(id)' to object (type 'container')")
        }
    }

    /// Whether an object `id` exists (of any type).
    func exists(_ id: String) -> Bool { lock.withLock { objects.contains { $0.id == id } } }

    func add(_ id: String, _ object: Object) { lock.withLock { objects.append((id, object)) } }

    func remove(_ id: String) -> Bool {
        lock.withLock {
            guard let i = objects.firstIndex(where: { $0.id == id }) else { return false }
            objects.remove(at: i)
            return true
        }
    }

    /// QEMU's `id_wellformed`.
    static func checkID(_ id: String) throws {
        if !JobManager.isWellFormed(id) { throw QMPError.generic("Parameter 'id' expects an identifier") }
    }

    /// A secret's bytes from `data` or `file`, decoded from base64 when asked.
    static func loadSecret(data: String?, file: String?, format: String) throws -> [UInt8] {
        var raw: [UInt8]
        switch (data, file) {
        case (nil, nil): throw QMPError.generic("Either 'file' or 'data' must be provided")
        case (.some, .some): throw QMPError.generic("'file' and 'data' are mutually exclusive")
        case (let d?, nil): raw = Array(d.utf8)
        case (nil, let path?):
            let fd = open(path, O_RDONLY | O_CLOEXEC)
            guard fd >= 0 else {
                throw QMPError.generic("Unable to read \(path): Failed to open file \u{201C}\(path)\u{201D}: \(BlockError.strerror(errno))")
            }
            defer { close(fd) }
            raw = []
            var chunk = [UInt8](repeating: 0, count: 4096)
            while true {
                let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
                if n < 0 && errno == EINTR { continue }
                guard n >= 0 else { throw QMPError.generic("Unable to read \(path): \(BlockError.strerror(errno))") }
                if n == 0 { break }
                raw += chunk[0..<n]
            }
        }
        if format == "base64" { raw = try base64Decode(raw) }
        return raw
    }

    /// Base64 as QEMU's `qbase64_decode` checks it: the alphabet, `=` padding only at the end.
    static func base64Decode(_ input: [UInt8]) throws -> [UInt8] {
        func value(_ c: UInt8) -> UInt8? {
            switch c {
            case UInt8(ascii: "A")...UInt8(ascii: "Z"): return c - UInt8(ascii: "A")
            case UInt8(ascii: "a")...UInt8(ascii: "z"): return c - UInt8(ascii: "a") + 26
            case UInt8(ascii: "0")...UInt8(ascii: "9"): return c - UInt8(ascii: "0") + 52
            case UInt8(ascii: "+"): return 62
            case UInt8(ascii: "/"): return 63
            default: return nil
            }
        }
        let body = input.prefix { $0 != UInt8(ascii: "=") }
        let padding = input.count - body.count
        guard body.allSatisfy({ value($0) != nil }), input[body.count...].allSatisfy({ $0 == UInt8(ascii: "=") }), padding <= 2 else {
            throw QMPError.generic("Base64 data contains invalid characters")
        }
        // Like glib's decoder, a trailing partial group gives the whole bytes it holds.
        var out: [UInt8] = []
        var acc: UInt32 = 0, bits = 0
        for c in body {
            acc = acc << 6 | UInt32(value(c) ?? 0)
            bits += 6
            if bits >= 8 { bits -= 8; out.append(UInt8((acc >> UInt32(bits)) & 0xff)) }
        }
        return out
    }
}

extension QMPObjects {
    /// A new object of `type` with `id` from its properties `args` (`object-add`'s members
    /// after `qom-type` and `id`), checked against the ids `objects` already holds.
    static func make(type: String, id: String, _ args: QMPArguments, checkingAgainst objects: QMPObjects) throws -> Object {
        switch type {
        case "secret":
            _ = try args.optionalBool("loaded")
            let format = try args.optionalEnum("format", ["raw", "base64"]) ?? "raw"
            let keyid = try args.optionalString("keyid")
            let iv = try args.optionalString("iv")
            let data = try args.optionalString("data")
            let file = try args.optionalString("file")
            try args.done()
            try QMPObjects.checkID(id)
            try objects.checkFree(id)
            if keyid != nil || iv != nil {
                throw QMPError.generic("Encrypted secrets (keyid, iv) are not supported by this implementation")
            }
            return .secret(try QMPObjects.loadSecret(data: data, file: file, format: format))
        case "iothread":
            var t = QMPObjects.IOThread(id: id)
            t.aioMaxBatch = try args.optionalInt("aio-max-batch") ?? 0
            t.threadPoolMin = try args.optionalInt("thread-pool-min") ?? 0
            t.threadPoolMax = try args.optionalInt("thread-pool-max") ?? 64
            t.pollMaxNs = try args.optionalInt("poll-max-ns") ?? 32768
            t.pollGrow = try args.optionalInt("poll-grow") ?? 0
            t.pollShrink = try args.optionalInt("poll-shrink") ?? 0
            try args.done()
            try QMPObjects.checkID(id)
            try objects.checkFree(id)
            return .iothread(t)
        default:
            // The members are not read: the type is refused whatever they are.
            args.markAllRead()
            try QMPObjects.checkID(id)
            try objects.checkFree(id)
            switch type {
            case "throttle-group":
                throw QMPError.generic("throttle-group objects are not supported by this implementation (no I/O throttling)")
            case "tls-creds-anon", "tls-creds-psk", "tls-creds-x509":
                throw QMPError.generic("TLS credentials support requires GNUTLS")
            default:
                throw QMPError.generic("invalid object type: \(type)")
            }
        }
    }

    /// The objects of QEMU's `--object` command-line options (`secret,id=sec0,data=...`,
    /// QemuOpts syntax with the type first), created in order as `object-add` creates them.
    /// - Throws: ``QMPError`` with `object-add`'s messages.
    public static func commandLine(_ specs: [String]) throws -> QMPObjects {
        let objects = QMPObjects()
        for spec in specs {
            let args = QMPArguments(try DriveOptions.parse(spec, impliedKey: "qom-type", keepID: true), keyval: true)
            let type = try args.enumValue("qom-type", QMPMonitor.objectTypeNames)
            let id = try args.string("id")
            objects.add(id, try make(type: type, id: id, args, checkingAgainst: objects))
        }
        return objects
    }
}
