import ArgumentParser
import QBlock
import ToolSupport
#if canImport(Glibc)
import Glibc
#endif

/// `img snapshot (-l | -c NAME | -a NAME | -d NAME) [-f fmt] [-q] [-U] FILE`: internal
/// snapshots, as `qemu-img snapshot` (QEMU 7.2) lists, creates, applies and deletes them.
/// (`-f` is an extension: qemu-img 7.2 probes the format here.)
struct ImgSnapshot: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "snapshot", abstract: "List, create, apply or delete internal snapshots.")

    @OptionGroup var image: ImageOptions
    @Flag(name: .customShort("l"), help: "List the snapshots.") var list = false
    @Option(name: .customShort("c"), parsing: .unconditional, help: "Create a snapshot with this name.") var create: String?
    @Option(name: .customShort("a"), parsing: .unconditional, help: "Revert the disk to this snapshot (id or name).") var apply: String?
    @Option(name: .customShort("d"), parsing: .unconditional, help: "Delete this snapshot (name or id).") var delete: String?
    @Flag(name: .customShort("q"), help: "Quiet.") var quiet = false
    @Argument(help: "Image file name.") var files: [String] = []

    func run() async throws {
        let actions = (list ? 1 : 0) + (create != nil ? 1 : 0) + (apply != nil ? 1 : 0) + (delete != nil ? 1 : 0)
        if actions > 1 { throw tool.usageError("Cannot mix '-l', '-a', '-c', '-d'") }
        guard files.count == 1, let filename = files.first else { throw tool.usageError("Expecting one image file name") }
        if image.forceShare && !list {
            throw tool.fail("Could not open '\(filename)': force-share=on can only be used with read-only images")
        }
        let node = try await image.open(filename, readOnly: list)
        try await closing(node) { try await perform(on: node, filename: filename) }
    }

    private func perform(on node: any BlockDriver, filename: String) async throws {
        let snapshotting = node as? any InternalSnapshotting
        if list {
            if let snapshotting { writeStdout(SnapshotInfo.listText(snapshotting.internalSnapshots)) }
        } else if let name = create {
            // qemu-img keeps the name in a 256-byte buffer.
            let tag = String(decoding: Array(name.utf8.prefix(255)), as: UTF8.self)
            guard let snapshotting else { throw tool.fail("Could not create snapshot '\(name)': -95 (Operation not supported)") }
            do {
                try await snapshotting.createInternalSnapshot(name: tag, icount: 0)
            } catch let e as BlockError {
                let err = e.errno ?? errnoFor(e)
                throw tool.fail("Could not create snapshot '\(name)': -\(err) (\(String(cString: strerror(err))))")
            }
        } else if let name = apply {
            guard let snapshotting else {
                if image.format == nil {
                    // qemu-img opens the image a second time when it falls back to the file
                    // layer, and warns again.
                    writeStderr(ToolProgram.rawProbeWarning(filename))
                }
                throw tool.fail("Could not apply snapshot '\(name)': Block driver does not support snapshots")
            }
            do {
                try await snapshotting.applySnapshot(idOrName: name)
            } catch let e as BlockError where e.operation == Qcow2Node.validateSnapshotL1Operation {
                // qemu-img: the table's fault on a line of its own, then the errno.
                tool.printError(e.message)
                let err = e.errno ?? EINVAL
                throw tool.fail("Could not apply snapshot '\(name)': Failed to load snapshot: \(String(cString: strerror(err)))")
            } catch let e as BlockError {
                let why = e.message.hasPrefix("Failed to load snapshot") || e.code == .busy ? e.message : "Failed to load snapshot: " + e.message
                throw tool.fail("Could not apply snapshot '\(name)': \(why)")
            }
        } else if let name = delete {
            // qemu-img 7.2 looks the snapshot up by name only (bdrv_snapshot_find).
            guard let snapshotting, snapshotting.internalSnapshots.contains(where: { $0.name == name }) else {
                throw tool.fail("Could not delete snapshot '\(name)': snapshot not found")
            }
            do {
                try await snapshotting.deleteSnapshot(idOrName: name)
            } catch let e as BlockError {
                throw tool.fail("Could not delete snapshot '\(name)': \(e.message)")
            }
        }
        try await node.flush()
    }

    /// The errno qemu-img would report for an error that carries none.
    private func errnoFor(_ e: BlockError) -> Int32 {
        switch e.code {
        case .unsupported: return ENOTSUP
        case .readOnly: return EACCES
        case .noSpace: return ENOSPC
        case .invalidArgument: return EINVAL
        case .notFound: return ENOENT
        default: return EIO
        }
    }
}
