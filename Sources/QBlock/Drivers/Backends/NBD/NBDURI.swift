import QBlockCore
import QBlockNBDWire
/// Where an NBD export lives, parsed from a URI in the NBD project's URI format
/// (`doc/uri.md`), as QEMU's nbd driver accepts it:
///
/// - `nbd://HOST[:PORT]/EXPORT` and `nbd+tcp://HOST[:PORT]/EXPORT` (port 10809 by default);
/// - `nbd+unix:///EXPORT?socket=PATH` (the authority must be empty).
///
/// The export name is the path without its leading `/`, percent-decoded; an empty path or
/// `/` names the default export (""). TLS (`nbds…`) is refused as unsupported.
public struct NBDURI: Sendable, Equatable, CustomStringConvertible {
    /// How to reach the server.
    public enum Transport: Sendable, Equatable {
        case tcp(host: String, port: UInt16)
        case unix(path: String)
    }

    /// TCP host and port, or Unix socket path.
    public var transport: Transport
    /// The export name, percent-decoded ("" for the default export).
    public var exportName: String
    /// The URI as given (used as the node's filename).
    public var text: String

    public var description: String { text }

    /// The schemes this parser knows (including TLS ones, which it refuses with a clear error).
    static let schemes = ["nbd", "nbd+tcp", "nbd+unix", "nbds", "nbds+tcp", "nbds+unix"]

    /// True if `filename` starts with an NBD URI scheme (`nbd://`, `nbd+unix://`, ...).
    public static func isNBDURI(_ filename: String) -> Bool {
        guard let r = filename.range(of: "://") else { return false }
        return schemes.contains(filename[..<r.lowerBound].lowercased())
    }

    /// The node's filename as QEMU's nbd driver writes it (`nbd_refresh_filename`):
    /// `nbd+unix://?socket=PATH`, `nbd+unix:///EXPORT?socket=PATH`, `nbd://HOST:PORT[/EXPORT]`.
    /// An IPv6 host cannot be written this way; the URI is then kept as given.
    public var canonicalFilename: String {
        switch transport {
        case .unix(let path):
            return exportName.isEmpty ? "nbd+unix://?socket=\(path)" : "nbd+unix:///\(exportName)?socket=\(path)"
        case .tcp(let host, let port):
            if host.contains(":") { return text }
            return exportName.isEmpty ? "nbd://\(host):\(port)" : "nbd://\(host):\(port)/\(exportName)"
        }
    }

    /// Where to connect, for error messages: `HOST:PORT` or the socket path.
    public var endpoint: String {
        switch transport {
        case .tcp(let host, let port): return host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
        case .unix(let path): return path
        }
    }

    /// Whether `text` uses QEMU's legacy syntax, `nbd:unix:PATH[:exportname=NAME]` or
    /// `nbd:HOST:PORT[:exportname=NAME]` (no `://`).
    public static func isLegacy(_ text: String) -> Bool {
        text.hasPrefix("nbd:") && !text.hasPrefix("nbd://")
    }

    /// The transport and export name of a legacy `nbd:` file name (QEMU's `nbd_parse_filename`).
    static func parseLegacy(_ text: String, _ bad: (String) -> BlockError) throws -> (Transport, String) {
        var rest = Substring(text.dropFirst("nbd:".count))
        var export = ""
        if let r = rest.range(of: ":exportname=") {
            export = String(rest[r.upperBound...])
            rest = rest[..<r.lowerBound]
        }
        if rest.hasPrefix("unix:") {
            let path = rest.dropFirst("unix:".count)
            guard !path.isEmpty else { throw bad("missing socket path") }
            return (.unix(path: String(path)), export)
        }
        var host = rest, portText: Substring = ""
        if rest.hasPrefix("["), let close = rest.firstIndex(of: "]") {
            host = rest[rest.index(after: rest.startIndex)..<close]
            let after = rest[rest.index(after: close)...]
            guard after.hasPrefix(":") else { throw bad("missing port") }
            portText = after.dropFirst()
        } else if let colon = rest.lastIndex(of: ":") {
            host = rest[..<colon]
            portText = rest[rest.index(after: colon)...]
        } else {
            throw bad("missing port")
        }
        guard !host.isEmpty, let port = UInt16(portText) else { throw bad("bad host or port") }
        return (.tcp(host: String(host), port: port), export)
    }

    /// Parses `text`.
    /// - Throws: ``BlockError`` `.invalidArgument` for a malformed URI, `.unsupported` for TLS.
    public init(_ text: String) throws {
        self.text = text
        func bad(_ why: String) -> BlockError {
            BlockError(.invalidArgument, "Invalid NBD URI '\(text)': \(why)", path: text, operation: "open")
        }
        if NBDURI.isLegacy(text) {
            (transport, exportName) = try NBDURI.parseLegacy(text, bad)
            return
        }
        guard let schemeEnd = text.range(of: "://") else { throw bad("missing '://'") }
        let scheme = text[..<schemeEnd.lowerBound].lowercased()
        guard NBDURI.schemes.contains(scheme) else { throw bad("unknown scheme '\(scheme)'") }
        if scheme.hasPrefix("nbds") {
            throw BlockError(.unsupported, "NBD over TLS ('\(scheme)://') is not supported", path: text, operation: "open")
        }
        var rest = Substring(text[schemeEnd.upperBound...])
        var query: Substring = ""
        if let q = rest.firstIndex(of: "?") {
            query = rest[rest.index(after: q)...]
            rest = rest[..<q]
        }
        if let f = rest.firstIndex(of: "#") { rest = rest[..<f] }
        let authority: Substring
        let path: Substring
        if let slash = rest.firstIndex(of: "/") {
            authority = rest[..<slash]
            path = rest[slash...]
        } else {
            authority = rest
            path = ""
        }
        guard let decodedPath = NBDURI.percentDecode(path) else { throw bad("bad percent-encoding in the export name") }
        exportName = decodedPath.hasPrefix("/") ? String(decodedPath.dropFirst()) : decodedPath
        if exportName.utf8.count > NBD.maxStringLength { throw bad("export name longer than 4096 bytes") }

        var params: [String: String] = [:]
        if !query.isEmpty {
            for pair in query.split(separator: "&", omittingEmptySubsequences: true) {
                let kv = pair.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
                guard let key = NBDURI.percentDecode(kv[0]),
                      let value = NBDURI.percentDecode(kv.count > 1 ? kv[1] : "") else { throw bad("bad percent-encoding in the query") }
                params[key] = value
            }
        }

        if scheme == "nbd+unix" {
            guard authority.isEmpty else { throw bad("a Unix socket URI has no host (use nbd+unix:///EXPORT?socket=PATH)") }
            guard let socket = params["socket"], !socket.isEmpty else { throw bad("missing 'socket' parameter") }
            guard params.count == 1 else { throw bad("unexpected query parameter") }
            transport = .unix(path: socket)
            return
        }
        guard params.isEmpty else { throw bad("unexpected query parameter for a TCP URI") }
        // Drop user information, if any.
        var hostPort = authority
        if let at = hostPort.lastIndex(of: "@") { hostPort = hostPort[hostPort.index(after: at)...] }
        var host: Substring
        var portText: Substring?
        if hostPort.hasPrefix("[") {
            guard let close = hostPort.firstIndex(of: "]") else { throw bad("unterminated IPv6 address") }
            host = hostPort[hostPort.index(after: hostPort.startIndex)..<close]
            let after = hostPort[hostPort.index(after: close)...]
            if !after.isEmpty {
                guard after.hasPrefix(":") else { throw bad("garbage after the IPv6 address") }
                portText = after.dropFirst()
            }
        } else if let colon = hostPort.lastIndex(of: ":") {
            host = hostPort[..<colon]
            portText = hostPort[hostPort.index(after: colon)...]
        } else {
            host = hostPort
        }
        if host.isEmpty { host = "localhost" }
        var port = NBD.defaultPort
        if let portText, !portText.isEmpty {
            guard let p = UInt16(portText), p > 0 else { throw bad("invalid port '\(portText)'") }
            port = p
        }
        transport = .tcp(host: String(host), port: port)
    }

    /// Decodes `%XX` escapes; nil for a malformed escape.
    static func percentDecode(_ s: Substring) -> String? {
        var out: [UInt8] = []
        out.reserveCapacity(s.utf8.count)
        var it = Array(s.utf8)[...]
        while let c = it.popFirst() {
            if c == UInt8(ascii: "%") {
                guard it.count >= 2, let hi = hexValue(it[it.startIndex]), let lo = hexValue(it[it.startIndex + 1]) else { return nil }
                out.append(hi << 4 | lo)
                it = it.dropFirst(2)
            } else {
                out.append(c)
            }
        }
        return String(decoding: out, as: UTF8.self)
    }

    private static func hexValue(_ c: UInt8) -> UInt8? {
        switch c {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): return c - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): return c - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): return c - UInt8(ascii: "A") + 10
        default: return nil
        }
    }
}
