import QBlockDrivers
import QBlockNBDServer
/// Serving an image over NBD for the duration of a closure.
extension Image {
    /// Exports this image over NBD (as `qemu-nbd` does) while `body` runs: clients connect
    /// to the URI `body` receives; when `body` ends they are disconnected (their requests
    /// in flight finish first) and the listening socket is closed.
    ///
    /// A ``LiveDisk``'s ``LiveDisk/active`` image can be exported too: clients then follow
    /// the disk across snapshots and mirror switches.
    ///
    /// ```swift
    /// try await image.withNBDExport(name: "disk", at: .unix(path: "/tmp/disk.sock")) { uri in
    ///     try await Image.withOpened(uri, mode: .readOnly) { remote in … }
    /// }
    /// ```
    /// - Parameters:
    ///   - name: the export name clients ask for ("" is the default export).
    ///   - address: where to listen: a Unix socket path, or a TCP host and port (port 0
    ///     picks a free one, which the URI then names).
    ///   - readOnly: refuse clients' writes.
    ///   - body: what to do while the export is served; it gets the export's URI.
    /// - Returns: what `body` returned.
    /// - Throws: ``BlockError`` if the image is closed, the address cannot be listened on, or
    ///   a writable export of a read-only image is asked for; or whatever `body` threw.
    public func withNBDExport<R>(
        name: String = "", at address: NBDServer.Address, readOnly: Bool = false,
        isolation: isolated (any Actor)? = #isolation,
        _ body: (NBDURI) async throws -> R
    ) async throws -> R {
        try checkOpen("export")
        let server = try translatingErrors { () throws -> NBDServer in
            let export = try NBDExport(name: name, node: backend, options: NBDExport.Options(readOnly: readOnly))
            return NBDServer(exports: [export], options: NBDServer.Options(maxClients: 16, persistent: true))
        }
        let uri: NBDURI
        do {
            let bound: NBDServer.Address
            switch address {
            case .unix(let path): bound = try server.listen(unix: path)
            case .tcp(let host, let port): bound = try server.listen(host: host, port: port)
            }
            try server.start()
            uri = try NBDURI(Self.uriText(bound, exportName: name))
        } catch {
            await server.shutdown()
            throw error.asBlockError
        }
        let result: R
        do {
            result = try await body(uri)
        } catch {
            await server.shutdown()
            throw error
        }
        await server.shutdown()
        return result
    }

    /// The NBD URI of export `name` at `address` (the export name percent-encoded).
    static func uriText(_ address: NBDServer.Address, exportName name: String) -> String {
        let unreserved = Set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~".utf8)
        var path = ""
        for b in name.utf8 {
            if unreserved.contains(b) {
                path.append(Character(Unicode.Scalar(b)))
            } else {
                let hex = Array("0123456789ABCDEF")
                path += "%" + String(hex[Int(b >> 4)]) + String(hex[Int(b & 15)])
            }
        }
        switch address {
        case .unix(let socket):
            return "nbd+unix:///\(path)?socket=\(socket)"
        case .tcp(let host, let port):
            let h = host.contains(":") ? "[\(host)]" : host
            return "nbd://\(h):\(port)/\(path)"
        }
    }
}
