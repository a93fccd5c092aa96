#if canImport(Glibc)
import Glibc
#endif
import QBlockCore
import QBlockDrivers
import QBlockGraph

/// Turns a filename and options into a tree of nodes — the format node on top of its `file`
/// protocol node, and the backing chain below it.
///
/// It sits above the drivers it chooses among: the protocol from ``ProtocolRegistry`` by the
/// file name (an NBD URI or a host file), the format from ``FormatRegistry`` by name or by
/// probing. Formats never open other formats by name themselves; they ask the opener for
/// their backing file.
public enum ImageOpener {
    /// Format names this build can open.
    public static var formats: [String] { FormatRegistry.names }

    /// Every block driver name QEMU 7.2 knows (QAPI's `BlockdevDriver`), whether or not this
    /// build has it: what qemu-img accepts as a format *name* where it only records the name
    /// (`rebase -u -F host_device`), and what QMP's `driver` members accept before the driver
    /// itself is looked up.
    public static let qemuDriverNames = [
        "blkdebug", "blklogwrites", "blkreplay", "blkverify", "bochs", "cloop", "compress", "copy-before-write",
        "copy-on-read", "dmg", "file", "snapshot-access", "ftp", "ftps", "gluster", "host_cdrom", "host_device",
        "http", "https", "iscsi", "luks", "nbd", "nfs", "null-aio", "null-co", "nvme", "parallels", "preallocate",
        "qcow", "qcow2", "qed", "quorum", "raw", "rbd", "replication", "ssh", "throttle", "vdi", "vhdx", "vmdk",
        "vpc", "vvfat",
    ]

    /// The drivers of ``qemuDriverNames`` that QEMU can create images with (`create_opts`).
    public static let qemuCreatableDrivers: Set<String> = ["file", "gluster", "luks", "nfs", "parallels", "qcow", "qcow2",
                                                           "qed", "raw", "rbd", "ssh", "vdi", "vhdx", "vmdk", "vpc"]

    /// The error for creating an image of `format` with a driver this build does not have:
    /// QEMU's "Format driver 'bochs' does not support image creation" for a driver QEMU has
    /// but cannot create with, else "Unknown file format 'NAME'".
    public static func creationRefusal(format: String, path: String? = nil) -> BlockError {
        if qemuDriverNames.contains(format) && !qemuCreatableDrivers.contains(format) {
            return BlockError(.unsupported, "Format driver '\(format)' does not support image creation", path: path, operation: "create")
        }
        return BlockError(.invalidArgument, "Unknown file format '\(format)'", path: path, operation: "create")
    }

    /// Opens a `json:{...}` pseudo-filename (QEMU's options written as a file name) in the
    /// mode an ``OpenOptions`` gives, returning the root node it names.
    public typealias JSONFilenameOpener = @Sendable (_ filename: String, _ options: OpenOptions) async throws -> any BlockDriver

    private static let jsonLock = PosixMutex()
    // Only touched with `jsonLock` held.
    nonisolated(unsafe) private static var jsonOpener: JSONFilenameOpener?

    /// Installs what opens `json:` names, here and for backing files that are named so.
    ///
    /// Parsing such a name needs every driver `blockdev-add` knows, which live in a layer
    /// above this one (QBlockMonitor's `DriveOpener`, which installs itself: its
    /// `installJSONFilenames()`; the tools and every `QMPMonitor` call it). Until then a
    /// `json:` name is refused.
    public static func setJSONFilenameOpener(_ opener: JSONFilenameOpener?) {
        jsonLock.withLock { jsonOpener = opener }
    }

    /// Whether `filename` is a `json:{...}` pseudo-filename.
    public static func isJSONFilename(_ filename: String) -> Bool { filename.hasPrefix("json:") }

    /// Opens a `json:` name through the installed opener.
    private static func openJSON(_ filename: String, options: OpenOptions) async throws -> any BlockDriver {
        guard let opener = jsonLock.withLock({ jsonOpener }) else {
            throw BlockError(.unsupported, "json: file names need the drive layer (DriveOpener.installJSONFilenames())",
                             path: filename, operation: "open")
        }
        return try await opener(filename, options)
    }

    /// Opens `filename` with `options` and returns the root node. A `json:{...}` name is
    /// opened by the installed ``JSONFilenameOpener``.
    /// - Throws: ``BlockError``: `.notFound`, `.locked`, `.corrupt`, `.unsupported`, ...
    public static func open(_ filename: String, options: OpenOptions = OpenOptions()) async throws -> any BlockDriver {
        if isJSONFilename(filename) { return try await openJSON(filename, options: options) }
        if let conflict = options.aio?.conflict(with: options.cache) {
            throw BlockError(.invalidArgument, conflict, path: filename, operation: "open")
        }
        var seen = Set<String>()
        var imageOptions = options
        // Snapshot mode: the image read-only, as a backing file is (QEMU's temporary snapshot).
        if options.snapshot { imageOptions.readOnly = true; imageOptions.copyOnRead = false }
        let root = try await open(filename, options: imageOptions, seen: &seen, isBacking: false)
        let top = options.snapshot ? try await temporaryOverlay(above: root, options: options) : root
        return options.copyOnRead && !options.readOnly ? CopyOnReadNode(child: top, ownsChild: true) : top
    }

    /// QEMU's temporary snapshot (`snapshot=on`): a qcow2 overlay of `root`'s size, in
    /// `$TMPDIR` (or /var/tmp, as QEMU), with no backing file name in its header, opened
    /// read-write with `root` as its backing node and unlinked at once, so it disappears with
    /// the process. The overlay owns `root`.
    /// - Throws: ``BlockError`` from creating or opening the overlay (`root` is closed then).
    package static func temporaryOverlay(above root: any BlockDriver, options: OpenOptions) async throws -> any BlockDriver {
        let dir = getenv("TMPDIR").map { String(cString: $0) }.flatMap { $0.isEmpty ? nil : $0 } ?? "/var/tmp"
        var template = Array("\(dir)/vl.XXXXXX".utf8CString)
        // SAFETY: mkstemp writes the generated name into the template's own storage.
        let fd = template.withUnsafeMutableBufferPointer { mkstemp($0.baseAddress!) }
        guard fd >= 0 else {
            let e = errno
            try? await root.close()
            throw BlockError(.io, "Could not get temporary filename: \(String(cString: strerror(e)))", errno: e, operation: "open")
        }
        Glibc.close(fd)
        let path = String(decoding: template.dropLast().map { UInt8(bitPattern: $0) }, as: UTF8.self)
        defer { unlink(path) }
        do {
            guard let qcow2 = FormatRegistry.driver(named: "qcow2") else {
                throw BlockError(.unsupported, "Unknown driver 'qcow2'", operation: "open")
            }
            try await qcow2.create(path: path, size: root.length, options: [])
            var o = options
            o.format = "qcow2"; o.readOnly = false; o.openBacking = false; o.snapshot = false
            o.copyOnRead = false; o.forceShare = false; o.formatOptions = nil
            var seen = Set<String>()
            let overlay = try await open(path, options: o, seen: &seen, isBacking: false)
            guard let linked = overlay as? any BackingLinked else {
                try? await overlay.close()
                throw BlockError(.unsupported, "Driver 'qcow2' does not support backing files", operation: "open")
            }
            linked.setBackingNode(root)
            return overlay
        } catch {
            try? await root.close()
            throw error
        }
    }

    /// Guesses the format of the image named `filename` (a host path or a URI a protocol
    /// claims) from its first bytes: opens it read-only through its protocol driver, reads
    /// them and closes it.
    /// - Returns: the format name, or nil when the image cannot be opened or read.
    public static func probeFormat(of filename: String) async -> String? {
        guard let node = try? await ProtocolRegistry.openNode(filename: filename, options: OpenOptions(readOnly: true, locking: false)) else {
            return nil
        }
        let head = try? await ProtocolRegistry.probeHead(of: node, filename: filename, count: FormatRegistry.probeLength)
        try? await node.close()
        return head.flatMap { FormatRegistry.probe($0)?.name }
    }

    /// Guesses the format of the host file at `path` from its first bytes ("qcow2", else
    /// "raw"), synchronously.
    public static func probe(_ path: String) throws -> String {
        let f = try FileNode(path: path, readOnly: true, locking: false)
        defer { Task { try? await f.close() } }
        return try probeFormat(f.probeBytes(count: FormatRegistry.probeLength), path: path)
    }

    static func probeFormat(_ head: [UInt8], path: String) throws -> String {
        guard let driver = FormatRegistry.probe(head) else {
            throw BlockError(.unsupported, "Could not determine the image format", path: path, operation: "probe")
        }
        return driver.name
    }

    /// Resolves a backing file name the way QEMU does: relative names are relative to the
    /// directory of the image that names them.
    /// A `json:` name stands for itself.
    public static func resolveBackingPath(_ backing: String, relativeTo imagePath: String) -> String {
        if backing.hasPrefix("/") || backing.contains("://") || isJSONFilename(backing) { return backing }
        guard let slash = imagePath.lastIndex(of: "/") else { return backing }
        return String(imagePath[...slash]) + backing
    }

    private static func canonical(_ path: String) -> String {
        guard let p = realpath(path, nil) else { return path }
        defer { free(p) }
        return String(cString: p)
    }

    private static func open(_ name: String, options: OpenOptions, seen: inout Set<String>,
                             isBacking: Bool) async throws -> any BlockDriver {
        if isJSONFilename(name) { return try await openJSON(name, options: options) }
        // (`file:NAME` is the host file NAME: the node and its messages carry NAME, as QEMU's.)
        let filename = ProtocolRegistry.strippingFilePrefix(name)
        let key = canonical(filename)
        if seen.contains(key) {
            throw BlockError(.invalidArgument, "Backing file '\(filename)' creates a loop in the backing chain (it is used twice)",
                             path: filename, operation: "open")
        }
        seen.insert(key)
        if seen.count > 256 {
            throw BlockError(.invalidArgument, "Backing chain is too long (more than 256 images)", path: filename, operation: "open")
        }
        // QEMU looks a backing file's driver up before opening it: "Unknown driver" alone
        // (iotests 114).
        if isBacking, let f = options.format, FormatRegistry.driver(named: f) == nil {
            throw BlockError(.unsupported, "Unknown driver '\(f)'", path: filename, operation: "open")
        }
        let file: any BlockDriver
        let format: String
        do {
            let node = try await ProtocolRegistry.openNode(filename: filename, options: options)
            file = node
            do {
                if let f = options.format {
                    format = f
                } else {
                    format = try probeFormat(try await ProtocolRegistry.probeHead(of: node, filename: filename, count: FormatRegistry.probeLength), path: filename)
                }
            } catch {
                try? await node.close()
                throw error
            }
        } catch let e as BlockError {
            // (The file layer's errors name the file twice in qemu-img's wording, the nbd layer's once.)
            throw BlockError(e.code, "Could not open '\(filename)': \(e.message)", errno: e.errno, path: filename,
                             operation: ProtocolRegistry.openOperation(forFilename: filename), underlying: e.underlying)
        }
        do {
            // (Only a host file takes image locks; an NBD server owns its image.)
            if options.locking, let hostFile = file.skippingFilters.innermostDriver as? any HostStorage {
                let (perm, shared) = lockPermissions(format: format, options: options)
                try hostFile.lock(perm: perm, shared: shared)
            }
            guard let driver = FormatRegistry.driver(named: format) else {
                throw BlockError(.unsupported, "Unknown driver '\(format)'", path: filename, operation: "open")
            }
            var chain = seen
            var formatOptions = options
            if options.format == nil {
                formatOptions.formatProbe = { @Sendable (head: [UInt8]) -> String? in FormatRegistry.probe(head)?.name }
            } else {
                formatOptions.formatProbe = nil
            }
            let node = try await driver.open(file: file, options: formatOptions) { backingName, backingFormat in
                var backingOptions = options
                backingOptions.readOnly = true
                backingOptions.format = backingFormat
                backingOptions.forRepair = false
                let path = resolveBackingPath(backingName, relativeTo: ProtocolRegistry.imagePath(forFilename: filename))
                do {
                    return try await open(path, options: backingOptions, seen: &chain, isBacking: true)
                } catch let e as BlockError {
                    throw BlockError(e.code, "Could not open backing file: \(e.message)", errno: e.errno,
                                     path: path, operation: "open backing")
                }
            }
            seen = chain
            return node
        } catch let e as BlockError {
            try? await file.close()
            if e.message.hasPrefix("Could not open") { throw e }
            // (The driver's own error stays reachable: qemu-io and qemu-nbd print it without
            // qemu-img's "Could not open" prefix; see ``formatDriverError(_:filename:)``.)
            throw BlockError(e.code, "Could not open '\(filename)': \(e.message)", errno: e.errno, path: filename,
                             offset: e.offset, operation: e.operation ?? "open", underlying: e)
        }
    }

    /// The image format driver's own error inside an open failure of ``open(_:options:)``
    /// for `filename` ("qcow2 header exceeds cluster size"), or nil when the failure did not
    /// come from the format driver (the file could not be opened, a backing file failed…).
    ///
    /// The opener words a format driver's failure as qemu-img does, "Could not open 'NAME':
    /// <driver's message>"; qemu-io and qemu-nbd put their own prefix before the driver's
    /// message instead, while a failure of the file layer keeps its "Could not open" there too.
    public static func formatDriverError(_ error: BlockError, filename: String) -> BlockError? {
        guard let inner = error.underlying as? BlockError,
              error.message == "Could not open '\(filename)': \(inner.message)" else { return nil }
        return inner
    }

    /// The permissions a format takes on its file and shares, as QEMU's drivers do (for a
    /// name that is no registered format, such as a `file` node of its own, QEMU's defaults).
    package static func lockPermissions(format: String, options: OpenOptions) -> (BlockPermissions, BlockPermissions) {
        if options.forceShare { return ([.consistentRead], .all) }
        if let driver = FormatRegistry.driver(named: format) { return driver.filePermissions(readOnly: options.readOnly) }
        return BlockPermissions.formatDefaults(readOnly: options.readOnly)
    }
}
