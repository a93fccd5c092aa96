import Synchronization
#if canImport(Glibc)
import Glibc
#endif
import QBlockCore
import QBlockDrivers
import QBlockGraph
import QBlockOpen
import QBlockOperations

/// An open disk image (a qcow2 chain, a raw file, an NBD export) with byte-addressed
/// reads and writes: the safe, high-level face of the library.
///
/// An image is only ever lent to a closure, which owns it for its duration:
///
/// ```swift
/// try await Image.create("base.qcow2", format: .qcow2, size: 1 << 30)
/// try await Image.withOpened("base.qcow2", format: .qcow2) { image in
///     try await image.write([UInt8](repeating: 0x5a, count: 4096), at: 0)
///     let back = try await image.read(at: 0, count: 4096)
///     try await image.flush()
///     print(try image.info.virtualSize, back.count)
/// }
/// ```
///
/// The image is flushed and closed when the closure returns or throws, and every call
/// after that fails with ``BlockError/Code-swift.struct/closed``. Offsets and sizes are
/// `Int64` bytes; reads and writes go straight between the caller's memory and the image
/// (no intermediate copy). Every method throws ``BlockError``.
///
/// For the zero-copy, driver-level interface (``BlockDriver``, ``BlockGraph``) see the
/// library's other types; this one trades their flexibility for ownership that cannot leak.
public final class Image: Sendable {
    /// Where requests enter: it counts them, so that closing waits for the last one.
    let backend: BlockBackend
    /// The node this image closes; nil for a view lent by a ``LiveDisk`` (which closes it).
    private let owned: (any BlockDriver)?
    private let closed = Atomic<Bool>(false)

    init(backend: BlockBackend, owned: (any BlockDriver)?) {
        self.backend = backend
        self.owned = owned
    }

    deinit {
        #if DEBUG
        if owned != nil && !closed.load(ordering: .acquiring) {
            let text = "QBlock: an Image of '\(backend.filename)' was released without being closed\n"
            _ = text.utf8CString.withUnsafeBytes { Glibc.write(2, $0.baseAddress, $0.count - 1) }
        }
        #endif
    }

    // MARK: Opening and closing

    /// Opens the image at `path`, lends it to `body`, and closes it on every way out.
    ///
    /// - Parameters:
    ///   - path: an image file, or an NBD URI (`nbd+unix:///EXPORT?socket=PATH`, `nbd://HOST:PORT/EXPORT`).
    ///   - format: the image's format, or ``FormatChoice/probe``.
    ///   - mode: read-only or read-write (backing images are always opened read-only).
    ///   - cache: the host cache mode for every file of the chain.
    ///   - locking: QEMU-compatible image locks.
    ///   - body: what to do with the image; its result is returned.
    /// - Returns: what `body` returned.
    /// - Throws: ``BlockError`` if the image cannot be opened or closed (a final flush that
    ///   fails), or whatever `body` threw (the image is still closed first).
    public static func withOpened<R>(
        _ path: String, format: FormatChoice = .probe, mode: AccessMode = .readWrite,
        cache: CacheMode = .writeback, locking: ImageLocking = .standard,
        isolation: isolated (any Actor)? = #isolation,
        _ body: (Image) async throws -> R
    ) async throws -> R {
        let image = try await open(path, format: format, mode: mode, cache: cache, locking: locking)
        return try await image.lend(to: body)
    }

    /// Opens the NBD export at `uri` (an image served by ``withNBDExport(name:at:readOnly:isolation:_:)``,
    /// qemu-nbd or QEMU), lends it to `body` and closes the connection on every way out.
    ///
    /// - Parameters:
    ///   - uri: where the export is.
    ///   - format: the format of the bytes the export serves: ``FormatChoice/raw`` for an
    ///     exported image (the server already decodes its format).
    ///   - mode: read-only or read-write.
    ///   - body: what to do with the image.
    /// - Returns: what `body` returned.
    /// - Throws: ``BlockError`` if the server cannot be reached or refuses the export, or
    ///   whatever `body` threw.
    public static func withOpened<R>(
        _ uri: NBDURI, format: FormatChoice = .raw, mode: AccessMode = .readWrite,
        isolation: isolated (any Actor)? = #isolation,
        _ body: (Image) async throws -> R
    ) async throws -> R {
        let image = try await open(uri.text, format: format, mode: mode, cache: .writeback, locking: .none)
        return try await image.lend(to: body)
    }

    /// Opens an image (the work of ``withOpened(_:format:mode:cache:locking:isolation:_:)``).
    static func open(_ path: String, format: FormatChoice, mode: AccessMode, cache: CacheMode,
                     locking: ImageLocking) async throws(BlockError) -> Image {
        if locking == .shareAll && mode != .readOnly {
            throw BlockError(.invalidArgument, "Sharing all permissions (ImageLocking.shareAll) needs a read-only image",
                             path: path, operation: "open")
        }
        let options = OpenOptions(format: format.format?.rawValue, readOnly: mode == .readOnly, cache: cache,
                                  forceShare: locking == .shareAll, locking: locking != .none)
        let driver = try await translatingErrors { try await ImageOpener.open(path, options: options) }
        let node = BlockNode(nodeName: "image", driver: driver)
        return Image(backend: BlockBackend(node: node), owned: node)
    }

    /// Runs `body` with this image, then closes it; closes it too if `body` throws.
    private func lend<R>(isolation: isolated (any Actor)? = #isolation, to body: (Image) async throws -> R) async throws -> R {
        let result: R
        do {
            result = try await body(self)
        } catch {
            try? await close()
            throw error
        }
        try await close()
        return result
    }

    /// Refuses new requests, waits for those in flight, then flushes and closes what this
    /// image owns. Idempotent.
    func close() async throws(BlockError) {
        guard !closed.exchange(true, ordering: .acquiringAndReleasing) else { return }
        // Waits for requests that entered before the flag was set.
        await backend.drainBegin()
        backend.drainEnd()
        if let owned { try await translatingErrors { try await owned.close() } }
    }

    /// Marks a lent view closed (its owner closes the nodes).
    func markClosed() { closed.store(true, ordering: .releasing) }

    /// Whether the image was closed (its scope ended).
    public var isClosed: Bool { closed.load(ordering: .acquiring) }

    func checkOpen(_ operation: String) throws(BlockError) {
        if closed.load(ordering: .acquiring) {
            throw BlockError(.closed, "The image was closed", path: backend.filename, operation: operation)
        }
    }

    // MARK: Creating and converting

    /// Creates an image file (`qemu-img create`), replacing what `path` held.
    ///
    /// - Parameters:
    ///   - path: the new file.
    ///   - format: its format.
    ///   - size: the size the guest sees, in bytes (raw images round it up to 512).
    ///   - backing: for qcow2, the image the new one starts from (reads of what it does not
    ///     hold fall through); it must exist.
    ///   - options: format options (cluster size, preallocation, …).
    /// - Throws: ``BlockError``: `.invalidArgument` for a negative size, an option the format
    ///   lacks or a backing file for raw; `.notFound` for a missing backing file; I/O errors.
    public static func create(_ path: String, format: ImageFormat, size: Int64, backing: BackingImage? = nil,
                              options: ImageCreateOptions = ImageCreateOptions()) async throws(BlockError) {
        guard size >= 0 else {
            throw BlockError(.invalidArgument, "Image size must not be negative", path: path, operation: "create")
        }
        try await translatingErrors {
            try await ImageCreator.create(format: format.rawValue, path: path, size: size, options: options.pairs,
                                          backingFile: backing?.path, backingFormat: backing?.format.rawValue)
        }
    }

    /// Copies what the image at `source` shows — its whole backing chain flattened — into a
    /// new image at `target` (`qemu-img convert`), keeping holes and zero areas sparse.
    ///
    /// - Parameters:
    ///   - source: the image to copy; it may be open elsewhere only for reading.
    ///   - sourceFormat: its format, or ``FormatChoice/probe``.
    ///   - target: the new file (replaced if it exists).
    ///   - format: the new file's format.
    ///   - options: the new file's format options.
    ///   - compressed: write compressed clusters (qcow2 only).
    /// - Throws: ``BlockError`` if the source cannot be read or the target not written.
    public static func convert(_ source: String, sourceFormat: FormatChoice = .probe, to target: String,
                               format: ImageFormat, options: ImageCreateOptions = ImageCreateOptions(),
                               compressed: Bool = false) async throws(BlockError) {
        var o = ConvertOptions()
        o.sourceFormat = sourceFormat.format?.rawValue
        o.targetFormat = format.rawValue
        o.createOptions = options.pairs
        o.compress = compressed
        // A library call returns with the data durable, unlike qemu-img's default (-t unsafe).
        o.targetCache = .writeback
        try await translatingErrors { try await Convert.run(sources: [source], target: target, options: o) }
    }

    // MARK: Describing

    /// The size the guest sees, in bytes.
    public var size: Int64 { backend.length }

    /// Whether writes are refused.
    public var isReadOnly: Bool { backend.isReadOnly }

    /// The image's format, size and backing chain.
    /// - Throws: ``BlockError`` `.closed` after the image's scope ended.
    public var info: ImageDescription {
        get throws(BlockError) {
            try checkOpen("info")
            return try ImageDescription(backend.node)
        }
    }

    // MARK: Reading

    /// Reads `count` bytes at `offset` into a new array.
    /// - Throws: ``BlockError``: `.outOfRange` past the end, `.closed`, I/O errors.
    public func read(at offset: Int64, count: Int) async throws(BlockError) -> [UInt8] {
        guard count >= 0 else { throw BlockError(.invalidArgument, "Negative read length", operation: "read") }
        var bytes = [UInt8](repeating: 0, count: count)
        try await read(at: offset, into: &bytes)
        return bytes
    }

    /// Fills `bytes` (all of it) with the image's content at `offset`.
    /// - Throws: ``BlockError``: `.outOfRange` past the end, `.closed`, I/O errors.
    public func read(at offset: Int64, into bytes: inout [UInt8]) async throws(BlockError) {
        var span = bytes.mutableSpan
        var raw = span.mutableBytes
        try await read(at: offset, into: &raw)
    }

    /// Fills `buffer` (all of it) with the image's content at `offset`, reading straight
    /// into the caller's memory.
    /// - Throws: ``BlockError``: `.outOfRange` past the end, `.closed`, I/O errors.
    public func read(at offset: Int64, into buffer: inout MutableRawSpan) async throws(BlockError) {
        try checkOpen("read")
        let count = Int64(buffer.byteCount)
        try translatingErrors { try backend.checkRequest(offset: offset, length: count, operation: "read") }
        // SAFETY: `buffer` is borrowed mutably for this whole call, so the memory it covers
        // stays valid and is not touched by anyone else until the call returns; the pointer
        // does not outlive the call (the requests below are awaited before it returns).
        let memory = buffer.withUnsafeMutableBytes { $0 }
        try await forEachPiece(offset: offset, count: memory.count) { at, range in
            try await self.backend.read(at: at, into: UnsafeMutableRawBufferPointer(rebasing: memory[range]))
        }
    }

    // MARK: Writing

    /// Writes `bytes` at `offset`.
    /// - Parameter flags: ``WriteFlags/fua`` to have the data on stable storage when the call returns.
    /// - Throws: ``BlockError``: `.readOnly`, `.outOfRange` past the end, `.closed`, `.noSpace`, I/O errors.
    public func write(_ bytes: [UInt8], at offset: Int64, flags: WriteFlags = []) async throws(BlockError) {
        try await write(bytes.span.bytes, at: offset, flags: flags)
    }

    /// Writes the bytes of `bytes` at `offset`, straight from the caller's memory.
    /// - Parameter flags: ``WriteFlags/fua`` to have the data on stable storage when the call returns.
    /// - Throws: ``BlockError``: `.readOnly`, `.outOfRange` past the end, `.closed`, `.noSpace`, I/O errors.
    public func write(_ bytes: RawSpan, at offset: Int64, flags: WriteFlags = []) async throws(BlockError) {
        try checkOpen("write")
        let count = Int64(bytes.byteCount)
        try translatingErrors { try backend.checkRequest(offset: offset, length: count, operation: "write") }
        // SAFETY: `bytes` is borrowed for this whole call, so the memory stays valid and
        // unchanged until the call returns; the requests below are awaited before that.
        let memory = bytes.withUnsafeBytes { $0 }
        try await forEachPiece(offset: offset, count: memory.count) { at, range in
            try await self.backend.write(at: at, from: UnsafeRawBufferPointer(rebasing: memory[range]), flags: flags)
        }
    }

    /// Makes `count` bytes at `offset` read as zeros.
    /// - Parameter deallocate: whether the area may be deallocated (it reads as zeros either way).
    /// - Throws: ``BlockError``: `.readOnly`, `.outOfRange`, `.closed`, I/O errors.
    public func writeZeroes(at offset: Int64, count: Int64, deallocate: Bool = true) async throws(BlockError) {
        try checkOpen("write zeroes")
        try await translatingErrors {
            try await backend.checkedWriteZeroes(at: offset, length: count, flags: deallocate ? [.mayUnmap] : [])
        }
    }

    /// Tells the image that `count` bytes at `offset` are no longer needed: they may be
    /// deallocated, and then read as zeros or as the backing file's data.
    /// - Throws: ``BlockError``: `.readOnly`, `.outOfRange`, `.closed`, I/O errors.
    public func discard(at offset: Int64, count: Int64) async throws(BlockError) {
        try checkOpen("discard")
        try await translatingErrors { try await backend.checkedDiscard(at: offset, length: count) }
    }

    /// Makes every completed write durable.
    /// - Throws: ``BlockError`` `.closed`, I/O errors.
    public func flush() async throws(BlockError) {
        try checkOpen("flush")
        try await translatingErrors { try await backend.flush() }
    }

    /// Calls `body` for each piece of at most ``BlockRequestLimits/maxBytes`` of the request.
    private func forEachPiece(offset: Int64, count: Int,
                              _ body: (Int64, Range<Int>) async throws -> Void) async throws(BlockError) {
        let step = Int(BlockRequestLimits.maxBytes)
        var done = 0
        while done < count {
            let n = min(step, count - done)
            let start = done
            try await translatingErrors { try await body(offset + Int64(start), start..<(start + n)) }
            done += n
        }
    }
}

/// Runs `body`, turning whatever it throws into a ``BlockError`` (the API's one error type).
func translatingErrors<R>(_ body: () async throws -> R) async throws(BlockError) -> R {
    do { return try await body() } catch { throw error.asBlockError }
}

/// Runs `body`, turning whatever it throws into a ``BlockError``.
func translatingErrors<R>(_ body: () throws -> R) throws(BlockError) -> R {
    do { return try body() } catch { throw error.asBlockError }
}
