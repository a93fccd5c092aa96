import Foundation
import QBlock
import ToolSupport
#if canImport(Glibc)
import Glibc
#endif

/// `nbd --qmp PATH [image]`: the storage-daemon role. A QMP monitor listens on PATH; disks
/// are opened, exported and snapshotted from it. With an image on the command line, the
/// image is added as node `disk0` and exported as qemu-nbd would (same -k/-p/-x/-r options),
/// through the monitor's own commands. Runs until `quit` or SIGTERM/SIGINT/SIGHUP.
extension Nbd {
    func runDaemon(qmp path: String, settings: Settings) async throws {
        let monitor = QMPMonitor()
        let server = QMPServer(monitor: monitor)
        do {
            if let filename {
                try await addImage(filename, to: monitor, settings: settings)
            }
            try server.listen(unix: path)
        } catch {
            await shutDown(monitor, server)
            throw tool.fail(QMPError.from(error).desc)
        }
        if let pidFile, !FileManager.default.createFile(atPath: pidFile, contents: Data("\(getpid())\n".utf8)) {
            await shutDown(monitor, server)
            throw tool.fail("Failed to write pid file '\(pidFile)'")
        }
        let done = AsyncEvent()
        monitor.onQuit { done.signal() }
        let signals = SignalWatcher { done.signal() }
        Daemon.signalReady()
        await done.wait()
        signals.cancel()
        await shutDown(monitor, server)
        if let pidFile { unlink(pidFile) }
    }

    private func shutDown(_ monitor: QMPMonitor, _ server: QMPServer) async {
        await server.shutdown()
        await monitor.stopNBDServer()
        await monitor.block.closeAll()
        await monitor.block.flushRemaining()
    }

    /// Opens the image as node `disk0` and exports it, with the monitor's commands.
    private func addImage(_ filename: String, to monitor: QMPMonitor, settings: Settings) async throws {
        if ImageSpec.isDriveSpec(filename, imageOpts: imageOpts) {
            throw QMPError.generic("With --qmp, an image given as options (json:, --image-opts) is not supported; add it with blockdev-add")
        }
        var fmt = "raw"
        if let format { fmt = format } else if let probed = await ImageOpener.probeFormat(of: filename) { fmt = probed }
        var cache = QObject.Dict()
        cache["direct"] = .bool(settings.cache.direct)
        cache["no-flush"] = .bool(settings.cache.ignoresFlush)
        // The protocol (a host file, an NBD URI) from the file name, as ImageOpener picks it.
        let file = try ProtocolRegistry.blockdevOptions(forFilename: filename)
        try await monitor.execute("blockdev-add", arguments: QObject.Dict([
            ("driver", .string(fmt)), ("node-name", .string("disk0")), ("read-only", .bool(readOnly)),
            ("cache", .dict(cache)), ("file", .dict(file)),
        ]))
        let addr: QObject.Dict
        if let socket {
            addr = QObject.Dict([("type", .string("unix")), ("data", .dict(QObject.Dict([("path", .string(socket))])))])
        } else {
            addr = QObject.Dict([("type", .string("inet")),
                                 ("data", .dict(QObject.Dict([("host", .string(bind)), ("port", .string(String(settings.port)))])))])
        }
        try await monitor.execute("nbd-server-start", arguments: QObject.Dict([
            ("addr", .dict(addr)), ("max-connections", .int(Int64(settings.shared))),
        ]))
        var export = QObject.Dict([("type", .string("nbd")), ("id", .string("export0")), ("node-name", .string("disk0")),
                                   ("writable", .bool(!readOnly)), ("name", .string(exportName))])
        if let exportDescription { export["description"] = .string(exportDescription) }
        try await monitor.execute("block-export-add", arguments: export)
    }
}
