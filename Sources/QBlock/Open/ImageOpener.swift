#if canImport(Glibc)
import Glibc
#endif
import QBlockCore
import QBlockDrivers
import QBlockGraph

/// Turns a filename and options into a tree of nodes — the format node on top of its `file`
/// protocol node, and the backing chain below it.
///
/// It sits above the drivers it chooses among: the protocol by the file name (an NBD URI
/// or a host file), the format from ``FormatRegistry`` by name or by probing. Formats
/// never open other formats by name themselves; they ask the opener for their backing file.
public enum ImageOpener {
    /// Format names this build can open.
    public static var formats: [String] { FormatRegistry.names }

    /// Opens `filename` with `options` and returns the root node.
    /// - Throws: ``BlockError``: `.notFound`, `.locked`, `.corrupt`, `.unsupported`, ...
    public static func open(_ filename: String, options: OpenOptions = OpenOptions()) async throws -> any BlockDriver {
        var seen = Set<String>()
        return try await open(filename, options: options, seen: &seen, isBacking: false)
    }

    /// Guesses the format of the file at `path` from its first bytes ("qcow2", else "raw").
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
    public static func resolveBackingPath(_ backing: String, relativeTo imagePath: String) -> String {
        if backing.hasPrefix("/") || backing.contains("://") { return backing }
        guard let slash = imagePath.lastIndex(of: "/") else { return backing }
        return String(imagePath[...slash]) + backing
    }

    private static func canonical(_ path: String) -> String {
        guard let p = realpath(path, nil) else { return path }
        defer { free(p) }
        return String(cString: p)
    }

    private static func open(_ filename: String, options: OpenOptions, seen: inout Set<String>,
                             isBacking: Bool) async throws -> any BlockDriver {
        let key = canonical(filename)
        if seen.contains(key) {
            throw BlockError(.invalidArgument, "Backing file '\(filename)' creates a loop in the backing chain (it is used twice)",
                             path: filename, operation: "open")
        }
        seen.insert(key)
        if seen.count > 256 {
            throw BlockError(.invalidArgument, "Backing chain is too long (more than 256 images)", path: filename, operation: "open")
        }
        let file: any BlockDriver
        let format: String
        do {
            if NBDURI.isNBDURI(filename) {
                // An NBD export: no image locks (the server owns the image).
                let node = try await NBDClientNode.connect(try NBDURI(filename), readOnly: options.readOnly)
                file = node
                if let f = options.format {
                    format = f
                } else {
                    do {
                        format = try probeFormat(try await node.read(at: 0, count: Int(min(Int64(FormatRegistry.probeLength), node.length))),
                                                 path: filename)
                    } catch {
                        try? await node.close()
                        throw error
                    }
                }
            } else {
                let f = try FileNode(path: filename, readOnly: options.readOnly, cache: options.cache, locking: false)
                file = f
                do {
                    format = try options.format ?? probeFormat(f.probeBytes(count: FormatRegistry.probeLength), path: filename)
                } catch {
                    try? await f.close()
                    throw error
                }
            }
        } catch let e as BlockError {
            // (The file layer's errors name the file twice in qemu-img's wording, the nbd layer's once.)
            throw BlockError(e.code, "Could not open '\(filename)': \(e.message)", errno: e.errno, path: filename,
                             operation: NBDURI.isNBDURI(filename) ? "nbd open" : "open", underlying: e.underlying)
        }
        do {
            if options.locking, let hostFile = file as? any HostStorage {
                let (perm, shared) = lockPermissions(format: format, options: options)
                try hostFile.lock(perm: perm, shared: shared)
            }
            guard let driver = FormatRegistry.driver(named: format) else {
                throw BlockError(.unsupported, "Unknown driver '\(format)'", path: filename, operation: "open")
            }
            var chain = seen
            let node = try await driver.open(file: file, options: options) { backingName, backingFormat in
                var backingOptions = options
                backingOptions.readOnly = true
                backingOptions.format = backingFormat
                backingOptions.forRepair = false
                let path = resolveBackingPath(backingName, relativeTo: filename)
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
            throw BlockError(e.code, "Could not open '\(filename)': \(e.message)", errno: e.errno, path: filename,
                             offset: e.offset, operation: e.operation ?? "open", underlying: e.underlying)
        }
    }

    /// The permissions a format takes on its file and shares, as QEMU's drivers do (for a
    /// name that is no registered format, such as a `file` node of its own, QEMU's defaults).
    package static func lockPermissions(format: String, options: OpenOptions) -> (BlockPermissions, BlockPermissions) {
        if options.forceShare { return ([.consistentRead], .all) }
        if let driver = FormatRegistry.driver(named: format) { return driver.filePermissions(readOnly: options.readOnly) }
        return BlockPermissions.formatDefaults(readOnly: options.readOnly)
    }
}
