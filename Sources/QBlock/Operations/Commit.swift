#if canImport(Glibc)
import Glibc
#endif
import QBlockCore
import QBlockDrivers
import QBlockGraph
import QBlockOpen

/// `qemu-img commit`: writes what an image (and the images between it and the base)
/// allocate into the base image, then empties the image unless told not to.
///
/// Each image of the chain is opened on its own (without its backing chain), the top
/// read-write, the intermediate images read-only and the base read-write, so that no file
/// is opened twice with conflicting locks.
public enum ImageCommit {
    static let chunkSize: Int64 = 2 << 20

    /// Commits the image at `path`.
    /// - Parameters:
    ///   - format: the image's format (nil: probed).
    ///   - base: the image to commit into, named as in the backing chain or by a path
    ///     (nil: the immediate backing file). Naming it keeps the top image as it is (-b implies -d).
    ///   - keepTop: do not empty the top image (`-d`).
    ///   - cache: host cache mode for every image.
    /// - Throws: ``BlockError`` worded as qemu-img's messages; nothing is written before
    ///   every image of the chain is open.
    public static func commit(path: String, format: String?, base: String? = nil, keepTop: Bool = false,
                              cache: CacheMode = .writeback, progress: ((Double) -> Void)? = nil) async throws {
        var options = OpenOptions(format: format, readOnly: false, cache: cache, openBacking: false)
        let top = try await ImageOpener.open(path, options: options)
        var opened: [any BlockDriver] = [top]
        func closeAll() async { for n in opened.reversed() { try? await n.close() } }
        do {
            // The chain below the top, by name, down to the base.
            var chain: [(path: String, format: String?)] = []
            var cur: any BlockDriver = top
            var curPath = path
            while let q = cur as? any BackingLinked, let name = q.backingFileName {
                let full = ImageOpener.resolveBackingPath(name, relativeTo: curPath)
                chain.append((full, q.backingFormat))
                if let base, matches(base, name: name, full: full, top: path) { break }
                if base == nil { break }
                options = OpenOptions(format: q.backingFormat, readOnly: true, cache: cache, openBacking: false)
                let next = try await ImageOpener.open(full, options: options)
                opened.append(next)
                cur = next
                curPath = full
            }
            guard let last = chain.last else {
                if let base { throw BlockError(.notFound, "Did not find '\(base)' in the backing chain of '\(path)'", path: path, operation: "commit") }
                throw BlockError(.invalidArgument, "Image does not have a backing file", path: path, operation: "commit")
            }
            if let base, !matches(base, name: (cur as? any BackingLinked)?.backingFileName ?? "", full: last.path, top: path) {
                throw BlockError(.notFound, "Did not find '\(base)' in the backing chain of '\(path)'", path: path, operation: "commit")
            }
            let baseNode = try await ImageOpener.open(last.path, options: OpenOptions(format: last.format, readOnly: false, cache: cache))
            opened.append(baseNode)
            // The layers whose data goes into the base: the top and the intermediate images.
            let layers = Array(opened.dropLast())
            do {
                try await copy(layers: layers, into: baseNode, progress: progress)
                try await baseNode.flush()
            } catch {
                // qemu-img runs the copy as a block job and reports its errno so.
                let e = error.asBlockError
                let reason = e.errno.map { BlockError.strerror($0) } ?? e.message
                throw BlockError(e.code, "Block job failed: \(reason)", errno: e.errno, path: e.path, offset: e.offset,
                                 operation: "commit", underlying: e)
            }
            if !keepTop && base == nil {
                guard let q = top as? any Emptiable else {
                    throw BlockError(.unsupported, "Committed data from '\(path)' but could not empty it: the image format does not support emptying",
                                     path: path, operation: "commit")
                }
                do { try await q.makeEmpty() } catch {
                    let e = error.asBlockError
                    throw BlockError(e.code, "Failed to empty \(path): \(e.message)", errno: e.errno, path: path,
                                     operation: "commit", underlying: e)
                }
            }
        } catch {
            await closeAll()
            throw error
        }
        for n in opened.reversed() { try await n.close() }
    }

    /// Whether `base` (as given on the command line) names the backing image stored as
    /// `name` and resolved to `full`. With `top` (the image the chain is searched from), a
    /// relative host path is taken relative to `top`'s folder and compared by real path, as
    /// QEMU's `bdrv_find_backing_image`: `commit -b t.mid sub/t.qcow2` finds `sub/t.mid`,
    /// `-b sub/t.mid` does not. Names with a protocol are compared as strings.
    package static func matches(_ base: String, name: String, full: String, top: String? = nil) -> Bool {
        let hasProtocol = { (s: String) in s.contains("://") || s.hasPrefix("json:") }
        if hasProtocol(base) || hasProtocol(name) { return base == name || base == full }
        guard let top else {
            if base == name || base == full { return true }
            return canonical(base) != nil && canonical(base) == canonical(full)
        }
        let resolved = ImageOpener.resolveBackingPath(base, relativeTo: top)
        return canonical(resolved) != nil && canonical(resolved) == canonical(full)
    }

    private static func canonical(_ path: String) -> String? {
        guard let p = realpath(path, nil) else { return nil }
        defer { free(p) }
        return String(cString: p)
    }

    /// Writes into `base` every run some layer allocates (the topmost layer that does wins).
    /// Beyond a lower layer's end the chain reads zeros, which counts as allocated there.
    static func copy(layers: [any BlockDriver], into base: any BlockDriver, progress: ((Double) -> Void)?) async throws {
        guard let top = layers.first else { return }
        let size = qemuLength(top)
        if qemuLength(base) < size {
            try await base.truncate(to: size, preallocation: .off)
        }
        let buf = AlignedBuffer(count: Int(chunkSize))
        var offset: Int64 = 0
        progress?(0)
        while offset < size {
            var n = min(chunkSize, size - offset)
            var source: (node: any BlockDriver, zero: Bool)?
            for layer in layers {
                if offset >= layer.length {
                    source = (layer, true)
                    break
                }
                n = min(n, layer.length - offset)
                let st = try await layer.blockStatus(at: offset, length: n)
                n = min(n, st.length)
                if st.flags.contains(.allocated) {
                    source = (layer, st.flags.contains(.zero) && !st.flags.contains(.data))
                    break
                }
            }
            if let source {
                if source.zero {
                    // QEMU's commit job unmaps zeroes in the base (mirror's unmap=true): its
                    // clusters there are freed (iotests 313).
                    try await base.writeZeroes(at: offset, length: n, flags: [.mayUnmap])
                } else {
                    try await buf.withUnsafeMutableBytes { b in
                        let part = UnsafeMutableRawBufferPointer(rebasing: b[0..<Int(n)])
                        try await source.node.read(at: offset, into: part)
                        try await base.write(at: offset, from: UnsafeRawBufferPointer(part), flags: [])
                    }
                }
            }
            offset += n
            if size > 0 { progress?(Double(offset) * 100 / Double(size)) }
        }
    }
}
