import ArgumentParser
import Foundation
import QBlock
import ToolSupport
#if canImport(Glibc)
import Glibc
#endif

/// How `nbd` reports errors: "nbd: message", as qemu-nbd's `error_report`.
let tool = ToolProgram.invoked(as: "nbd")

/// `nbd`: a qemu-nbd work-alike — exports one image over NBD with QBlock's server.
@main
struct Nbd: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "nbd",
        abstract: "Export a disk image over NBD (qemu-nbd compatible).")

    @Option(name: [.customShort("f"), .customLong("format")], help: "Image format (raw, qcow2); probed when omitted.")
    var format: String?

    @Option(name: [.customShort("x"), .customLong("export-name")], help: "Export name (default: empty).")
    var exportName: String = ""

    @Option(name: [.customShort("D"), .customLong("description")], help: "Export description.")
    var exportDescription: String?

    @Flag(name: [.customShort("r"), .customLong("read-only")], help: "Export read-only.")
    var readOnly = false

    @Flag(name: [.customShort("t"), .customLong("persistent")], help: "Keep serving after the last client disconnects.")
    var persistent = false

    @Option(name: [.customShort("e"), .customLong("shared")], help: "Clients served at once (default 1).")
    var shared: String = "1"

    @Option(name: [.customShort("k"), .customLong("socket")], help: "Listen on this Unix socket path instead of TCP.")
    var socket: String?

    @Option(name: [.customShort("b"), .customLong("bind")], help: "Address to listen on (default 0.0.0.0).")
    var bind: String = "0.0.0.0"

    @Option(name: [.customShort("p"), .customLong("port")], help: "TCP port to listen on (default 10809).")
    var port: String = "10809"

    @Option(name: .customLong("cache"), help: "Host cache mode: none, writeback, writethrough, directsync, unsafe.")
    var cache: String?

    @Option(name: .customLong("discard"), help: "Discard mode: ignore (default) or unmap.")
    var discard: String = "ignore"

    @Option(name: .customLong("detect-zeroes"), help: "Turn all-zero writes into zero writes: off, on, unmap.")
    var detectZeroes: String = "off"

    @Option(name: [.customShort("B"), .customLong("bitmap")], help: "Export the persistent dirty bitmap NAME as the qemu:dirty-bitmap:NAME context (repeatable).")
    var bitmap: [String] = []

    @Flag(name: [.customShort("A"), .customLong("allocation-depth")], help: "Offer the qemu:allocation-depth context.")
    var allocationDepth = false

    @Option(name: .customLong("pid-file"), help: "Write the server's process id to this file.")
    var pidFile: String?

    @Flag(name: .customLong("fork"), help: "Go to the background once the socket is listening.")
    var fork = false

    @Option(name: .customLong("qmp"), help: "Daemon mode: serve a QMP monitor on this Unix socket (the image is optional).")
    var qmp: String?

    @Flag(name: [.customShort("v"), .customLong("verbose")], help: "Verbose (accepted; nothing more is printed).")
    var verbose = false

    @Flag(name: [.customShort("L"), .customLong("list")], help: "List the exports of the server at -k SOCKET or -b HOST -p PORT, and exit.")
    var list = false

    @Option(name: [.customShort("o"), .customLong("offset")], help: "Export the image from this byte offset on (a raw window).")
    var offset: String?

    @Option(name: [.customShort("l"), .customLong("load-snapshot")], help: "Export this internal snapshot (ID_OR_NAME or snapshot.id=,snapshot.name=), read-only.")
    var loadSnapshot: String?

    @Flag(name: [.customShort("s"), .customLong("snapshot")], help: "Writes go to a temporary overlay; the image is not changed.")
    var snapshot = false

    @Flag(name: [.customShort("n"), .customLong("nocache")], help: "Disable the host cache (same as --cache=none).")
    var noCache = false

    @Option(name: .customLong("aio"), help: "How requests reach the host: threads, native (needs --cache=none) or io_uring.")
    var aio: String?

    @Flag(name: .customLong("image-opts"), help: "The file name is an option string (driver=qcow2,file.filename=...).")
    var imageOpts = false

    @Option(name: .customLong("object"), help: "Create a user object (secret,id=ID,data=...); repeatable.")
    var objects: [String] = []

    @Argument(help: "Image file name.")
    var filename: String?

    static func main() async {
        // A parent may have started us with termination signals blocked (a thread's mask is
        // inherited); unblock them so that SIGTERM shuts the server down.
        var set = sigset_t()
        sigemptyset(&set)
        for sig in [SIGTERM, SIGINT, SIGHUP] { sigaddset(&set, sig) }
        pthread_sigmask(SIG_UNBLOCK, &set, nil)
        await tool.main(Nbd.self)
    }

    func run() async throws {
        if list { return try await listExports() }
        let settings = try validateSettings()
        if qmp == nil && filename == nil { throw tool.fail("Expected exactly one image file name") }
        if fork && Daemon.readyFD == nil {
            // The parent: start the server as a detached child and wait until it listens.
            throw ExitCode(Daemon.spawnAndWait())
        }
        if Daemon.readyFD != nil { _ = setsid() }
        if let qmp { return try await runDaemon(qmp: qmp, settings: settings) }

        var underneath: (any BlockDriver)?
        let node = try await openImage(settings, filename: filename ?? "", underneath: &underneath)
        do {
            try await serve(node, settings: settings)
        } catch {
            try? await underneath?.close()
            throw error
        }
        try? await underneath?.close()
    }

    /// Exports `node` until the server stops, then closes it (qemu-nbd's main loop).
    func serve(_ node: any BlockDriver, settings: Settings) async throws {
        let export: NBDExport
        do {
            var options = settings.exportOptions
            // qemu-nbd prepends each -B to its list: contexts come in reverse order.
            options.bitmaps = try bitmap.reversed().map { try Self.findBitmap($0, from: node) }
            export = try NBDExport(name: exportName, description: exportDescription, node: node, options: options)
        } catch let e as BlockError {
            try? await node.close()
            // qemu-nbd prints the error without its hint line.
            throw tool.fail(String(e.message.split(separator: "\n").first ?? ""))
        }
        let server = NBDServer(exports: [export], options: NBDServer.Options(maxClients: settings.shared, persistent: persistent))
        do {
            if let socket {
                try server.listen(unix: socket)
            } else {
                try server.listen(host: bind, port: settings.port)
            }
        } catch let e as BlockError {
            try? await node.close()
            throw tool.fail(e.message)
        }
        if let pidFile {
            let ok = FileManager.default.createFile(atPath: pidFile, contents: Data("\(getpid())\n".utf8))
            if !ok {
                await server.shutdown()
                try? await node.close()
                throw tool.fail("Failed to write pid file '\(pidFile)'")
            }
        }
        do {
            try server.start()
        } catch let e as BlockError {
            try? await node.close()
            throw tool.fail(e.message)
        }
        let signals = SignalWatcher { Task { await server.shutdown() } }
        Daemon.signalReady()
        var failure: BlockError?
        do {
            try await server.run()
        } catch let e as BlockError {
            failure = e
        }
        signals.cancel()
        do {
            try await node.close()
        } catch let e as BlockError {
            if failure == nil { failure = e }
        }
        if let pidFile { unlink(pidFile) }
        if let failure { throw tool.fail(failure.message) }
    }

    /// The bitmap `name` of `node` or of the first image below it that has one, as qemu-nbd
    /// searches its backing chain.
    static func findBitmap(_ name: String, from node: any BlockDriver) throws -> DirtyBitmap {
        var n: (any BlockDriver)? = node
        while let cur = n {
            if let b = (cur as? any PersistentBitmapStore)?.persistentBitmaps.named(name) { return b }
            n = cur.backing
        }
        throw BlockError(.notFound, "Bitmap '\(name)' is not found", operation: "add export")
    }

    struct Settings {
        var shared: Int
        var port: UInt16
        var cache: CacheMode
        var aio: AIOMode?
        var offset: Int64
        var exportOptions: NBDExport.Options
    }

    /// `--list`: the exports of the server at `-k` or `-b`/`-p`, in qemu-nbd's words.
    func listExports() async throws {
        if filename != nil { throw tool.fail("List mode is incompatible with a file name") }
        if !exportName.isEmpty || exportDescription != nil || offset != nil || format != nil || loadSnapshot != nil
            || !bitmap.isEmpty || allocationDepth || aio != nil || discard != "ignore" || cache != nil || noCache {
            throw tool.fail("List mode is incompatible with per-device settings")
        }
        if fork { throw tool.fail("List mode is incompatible with forking") }
        let text: String
        if let socket {
            text = "nbd+unix:///?socket=\(socket)"
        } else {
            guard let p = UInt16(port) else { throw tool.fail("Invalid port number `\(port)'") }
            // (qemu-nbd lists from "localhost" unless -b names a host.)
            let host = bind == "0.0.0.0" ? "localhost" : bind
            text = "nbd://\(host.contains(":") ? "[\(host)]" : host):\(p)"
        }
        do {
            let exports = try await NBDExportList.list(try NBDURI(text))
            writeStdout(NbdListOutput.render(exports))
        } catch let e as BlockError {
            throw tool.fail(e.message)
        }
    }

    /// Checks the options as qemu-nbd does, with its messages.
    func validateSettings() throws -> Settings {
        guard let n = Int(shared), n >= 1 else { throw tool.fail("Invalid shared device number '\(shared)'") }
        guard let p = UInt16(port) else { throw tool.fail("Invalid port number `\(port)'") }
        var cacheMode = CacheMode.writeback
        if noCache && cache != nil { throw tool.fail("-n and --cache can only be specified once") }
        if let cache = noCache ? "none" : cache {
            guard let c = CacheMode(qemuName: cache) else { throw tool.fail("Invalid cache mode `\(cache)'") }
            cacheMode = c
        }
        var aioMode: AIOMode?
        if let aio {
            guard let a = AIOMode(qemuName: aio) else { throw tool.fail("Invalid aio mode '\(aio)'") }
            aioMode = a
        }
        var start: Int64 = 0
        if let offset {
            // (qemu_strtou64: decimal, 0x hexadecimal or 0 octal, nothing after the number.)
            let t = offset.lowercased()
            let v = t.hasPrefix("0x") ? Int64(t.dropFirst(2), radix: 16) : (t.count > 1 && t.hasPrefix("0") ? Int64(t.dropFirst(), radix: 8) : Int64(t))
            guard let v, v >= 0 else { throw tool.fail("Invalid offset '\(offset)'") }
            start = v
        }
        guard let d = NBDExport.DiscardMode(rawValue: discard) else { throw tool.fail("Invalid discard mode `\(discard)'") }
        guard let z = NBDExport.DetectZeroes(rawValue: detectZeroes) else {
            throw tool.fail("Invalid detect-zeroes mode '\(detectZeroes)'")
        }
        if z == .unmap && d != .unmap {
            throw tool.fail("setting detect-zeroes to unmap is not allowed without setting discard operation to unmap")
        }
        do { _ = try ImageSpec.objects(objects) } catch let e as BlockError { throw tool.fail(e.message) }
        if imageOpts && format != nil { throw tool.fail("--image-opts and -f are mutually exclusive") }
        if let format, !ImageOpener.formats.contains(format) {
            throw tool.fail("Unknown file format '\(format)'")
        }
        if exportName.utf8.count > 4096 { throw tool.fail("export name '\(exportName)' too long") }
        if let d = exportDescription, d.utf8.count > 4096 { throw tool.fail("description '\(d)' too long") }
        // qemu-nbd advertises multi-connection exactly when more than one client may connect.
        let options = NBDExport.Options(readOnly: readOnly, discard: d, detectZeroes: z, allocationDepth: allocationDepth,
                                        writethrough: cacheMode.writeThrough, multiConnection: n > 1)
        var exportOptions = options
        // (-l implies a read-only export, as in qemu-nbd.)
        if loadSnapshot != nil { exportOptions.readOnly = true }
        return Settings(shared: n, port: p, cache: cacheMode, aio: aioMode, offset: start, exportOptions: exportOptions)
    }

    /// Opens the image to export; with `-l`, `underneath` receives the image below the
    /// snapshot view that is returned (closed after the view).
    func openImage(_ s: Settings, filename: String, underneath: inout (any BlockDriver)?) async throws -> any BlockDriver {
        let ro = readOnly || loadSnapshot != nil
        var options = OpenOptions(format: format, readOnly: ro, cache: s.cache)
        options.aio = s.aio
        options.snapshot = snapshot
        do {
            var node = try await ImageSpec.open(filename, imageOpts: imageOpts, options: options, warning: ImageSpec.printWarning(tool))
            if format == nil && node.driverName == "raw" && !ro && !snapshot && !ImageSpec.isDriveSpec(filename, imageOpts: imageOpts) {
                writeStderr(ToolProgram.rawProbeWarning(filename))
            }
            // --offset: a raw window over the image from that byte on (qemu-nbd's raw node with `offset`).
            if s.offset > 0 { node = RawNode(file: node, offset: s.offset) }
            if let loadSnapshot {
                do {
                    let view = try await InternalSnapshotView.open(loadSnapshot, of: node)
                    underneath = node
                    node = view
                } catch let e as BlockError {
                    try? await node.close()
                    throw tool.fail(e.message)
                }
            }
            return node
        } catch let e as BlockError {
            if ImageSpec.isDriveSpec(filename, imageOpts: imageOpts) { throw tool.fail("Failed to blk_new_open '\(filename)': \(e.message)") }
            throw tool.fail(e.message.hasPrefix("Could not open") ? e.message : "Failed to blk_new_open '\(filename)': \(e.message)")
        }
    }
}
