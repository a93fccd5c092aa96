#if canImport(Glibc)
import Glibc
#endif
import QBlockCore
import QBlockGraph
import QBlockNBDWire
/// The `nbd` protocol driver as the registry sees it (``ProtocolDriver``): an export of an
/// NBD server, named by an NBD URI (``NBDURI``) or by `blockdev-add`'s `server` and
/// `export`. It opens an ``NBDClientNode``; the server owns the image, so no image locks.
public enum NBDProtocol: ProtocolDriver {
    /// `nbd`, as QEMU names the driver.
    public static let name = "nbd"

    /// `nbd`, `nbd+tcp`, `nbd+unix` and the TLS schemes (which ``NBDURI`` refuses clearly).
    public static var uriSchemes: [String] { NBDURI.schemes }

    /// QEMU's legacy `nbd:unix:PATH[:exportname=NAME]` and `nbd:HOST:PORT[:exportname=NAME]`.
    public static func claimsLegacyFilename(_ filename: String) -> Bool { NBDURI.isLegacy(filename) }

    /// "nbd open": qemu-img names the URI once in these errors.
    public static let openOperation = "nbd open"

    /// Connects to the export the URI `filename` names (read-only when `options` says so;
    /// the cache mode does not apply).
    /// - Throws: ``BlockError`` from ``NBDURI/init(_:)`` and ``NBDClientNode/connect(_:readOnly:pool:)``;
    ///   `.readOnly` "Could not open image: Permission denied" (qemu-img's words) when a
    ///   read-only export is opened for writing.
    public static func open(filename: String, options: OpenOptions) async throws -> any BlockDriver {
        let node = try await NBDClientNode.connect(try NBDURI(filename), readOnly: options.readOnly)
        if !options.readOnly && node.isReadOnly {
            try? await node.close()
            throw BlockError(.readOnly, "Could not open image: \(BlockError.strerror(EACCES))", errno: EACCES, path: filename,
                             operation: openOperation)
        }
        return node
    }

    /// Reads QEMU's `BlockdevOptionsNbd`: `server` (a flat QAPI `SocketAddress`), `export`
    /// (the default export when absent), `x-dirty-bitmap` and `open-timeout`
    /// (``NBDClientOptions``). This client has no TLS: `tls-creds` is refused as QEMU refuses
    /// credentials that do not exist (no TLS credentials object can be created here), and
    /// `tls-hostname`, which QEMU reads only with `tls-creds`, is then without effect as in
    /// QEMU. It does not reconnect after a lost connection: a `reconnect-delay` other than 0
    /// is refused.
    /// - Throws: the reader's errors, ``BlockError`` for a socket address it cannot use,
    ///   `tls-creds`, a `reconnect-delay`, an over-long `x-dirty-bitmap`; the opener throws
    ///   QEMU's "Failed to connect to 'PATH': …" for a Unix socket, else the client's error.
    public static func readBlockdevOptions(_ m: any DriverOptionReader) throws -> ProtocolOpener {
        let server = try m.requiredObjectMembers("server")
        let export = try m.optionalString("export") ?? ""
        let tlsCreds = try m.optionalString("tls-creds")
        _ = try m.optionalString("tls-hostname")
        let bitmap = try m.optionalString("x-dirty-bitmap")
        let reconnectDelay = try m.optionalUInt("reconnect-delay", bits: 32) ?? 0
        let openTimeout = try m.optionalUInt("open-timeout", bits: 32) ?? 0
        let address = try NBDURI.Transport(socketAddress: server, legacy: false)
        if let tlsCreds {
            throw BlockError(.invalidArgument, "No TLS credentials with id '\(tlsCreds)'")
        }
        if let bitmap, bitmap.utf8.count > NBD.maxStringLength {
            throw BlockError(.invalidArgument, "x-dirty-bitmap query too long to send to server")
        }
        if reconnectDelay != 0 {
            throw BlockError(.unsupported, "reconnect-delay=\(reconnectDelay) is not supported: the NBD client does not reconnect after losing its connection (only 0 is accepted)")
        }
        let options = NBDClientOptions(statusContext: bitmap, openTimeout: UInt32(openTimeout))
        let text = NBDURI.text(address, exportName: export)
        return { readOnly, _ in
            do {
                return try await NBDClientNode.connect(try NBDURI(text), readOnly: readOnly, options: options)
            } catch let e as BlockError {
                if case .unix(let path) = address, let err = e.errno, e.operation != "nbd open" {
                    throw BlockError(e.code, "Failed to connect to '\(path)': \(BlockError.strerror(err))", errno: err)
                }
                throw e
            }
        }
    }

    /// `{"driver": "nbd", "server": {…}, "export": NAME}` for the NBD URI `filename`.
    /// - Throws: ``BlockError`` for a malformed URI or TLS, as ``NBDURI/init(_:)``.
    public static func blockdevOptions(filename: String) throws -> QObject.Dict {
        let uri = try NBDURI(filename)
        let server: QObject.Dict
        switch uri.transport {
        case .unix(let path): server = QObject.Dict([("type", .string("unix")), ("path", .string(path))])
        case .tcp(let host, let port): server = QObject.Dict([("type", .string("inet")), ("host", .string(host)), ("port", .string(String(port)))])
        }
        return QObject.Dict([("driver", .string(name)), ("server", .dict(server)), ("export", .string(uri.exportName))])
    }
}

extension NBDURI {
    /// The URI of the export `exportName` at `transport`: `nbd+unix:///EXPORT?socket=PATH` or
    /// `nbd://HOST:PORT/EXPORT` (an IPv6 host in brackets), the export name percent-encoded.
    static func text(_ transport: Transport, exportName: String) -> String {
        let encoded = percentEncode(exportName)
        switch transport {
        case .unix(let path): return "nbd+unix:///\(encoded)?socket=\(path)"
        case .tcp(let host, let port): return "nbd://\(host.contains(":") ? "[\(host)]" : host):\(port)/\(encoded)"
        }
    }

    /// Percent-encodes what an NBD URI path may not hold (all but RFC 3986's unreserved characters).
    static func percentEncode(_ s: String) -> String {
        var out = ""
        for b in s.utf8 {
            let c = Character(UnicodeScalar(b))
            if (b >= 0x30 && b <= 0x39) || (b >= 0x41 && b <= 0x5A) || (b >= 0x61 && b <= 0x7A) || "-._~".contains(c) {
                out.append(c)
            } else {
                out += "%" + (b < 16 ? "0" : "") + String(b, radix: 16, uppercase: true)
            }
        }
        return out
    }
}

extension NBDURI.Transport {
    /// Reads a QAPI socket address: `SocketAddress` (flat, `{"type": "unix", "path": …}`, as
    /// `blockdev-add`'s `server`) or, with `legacy`, `SocketAddressLegacy` (`{"type":
    /// "unix", "data": {"path": …}}`, as `nbd-server-start`'s `addr`). Only `unix` and
    /// `inet` addresses can be used; the other members QEMU has are accepted and ignored.
    /// Reports members left over (in `data` too).
    /// - Throws: the reader's errors, ``BlockError`` "Parameter 'port' expects a port number"
    ///   or "Socket address type 'TYPE' is not supported here".
    package init(socketAddress a: any DriverOptionReader, legacy: Bool) throws {
        let type = try a.requiredEnum("type", ["inet", "unix", "vsock", "fd"])
        let body = legacy ? try a.requiredObjectMembers("data") : a
        switch type {
        case "unix":
            let path = try body.requiredString("path")
            _ = try body.optionalBool("abstract")
            _ = try body.optionalBool("tight")
            self = .unix(path: path)
        case "inet":
            let host = try body.requiredString("host")
            let port = try body.requiredString("port")
            for k in ["numeric", "ipv4", "ipv6", "keep-alive", "mptcp"] { _ = try body.optionalBool(k) }
            _ = try body.optionalUInt("to", bits: 16)
            guard let p = UInt16(port) else { throw BlockError(.invalidArgument, "Parameter 'port' expects a port number") }
            self = .tcp(host: host, port: p)
        default:
            throw BlockError(.unsupported, "Socket address type '\(type)' is not supported here")
        }
        if legacy { try body.done() }
        try a.done()
    }
}
