#if canImport(Glibc)
import Glibc
#endif
import QBlockCore

/// A crash-safe file holding one ``DirtyBitmap`` next to an image that cannot store it
/// (a raw source being mirrored).
///
/// ```
///  0     magic "QBDIRTY1" (8)   8  version u32 = 1   12 header size u32 = 4096
///  16    disk size u64          24 granularity u64   32 page size u32 = 4096
///  36    zero up to 4096
///  4096  the bits in QEMU's serialized order: chunk c is bit c % 8 of byte c / 8,
///        in pages of 4096 bytes (32768 chunks each)
/// ```
/// (every field little-endian).
///
/// Crash safety: ``syncNewlyDirty()`` writes every page that gained 1 bits since it was
/// last written — as the OR of what the file holds and the bitmap, so that it never clears
/// a bit — and calls `fdatasync`; a writer calls it before its flush completes. Pages that
/// only lost bits are written by ``writeBackClean()`` (and ``close()``). So after a crash,
/// reopening gives a bitmap in which every chunk written before a completed flush is dirty
/// (chunks reset since the last ``writeBackClean()`` may come back dirty, which is safe).
///
/// All system calls go through ``Syscalls`` on the ``IOThreadPool``; operations on one side
/// file are serialized.
// @unchecked: `fd` and `onDisk` are only touched with the AsyncMutex `lock` held; the other stored
// properties are immutable (`bitmap` is thread-safe itself).
public final class BitmapSideFile: @unchecked Sendable {
    static let magic: [UInt8] = Array("QBDIRTY1".utf8)
    static let version: UInt32 = 1
    static let headerSize = 4096
    /// Bytes of bits per page.
    public static let pageSize = 4096

    /// The bitmap the file mirrors.
    public let bitmap: DirtyBitmap
    /// The side file's path.
    public let path: String
    private let lock = AsyncMutex()
    private var fd: Int32
    /// What the file holds, page by page (the bits part only).
    private var onDisk: [UInt8]
    private let pageCount: Int

    private init(path: String, fd: Int32, bitmap: DirtyBitmap, onDisk: [UInt8]) {
        self.path = path
        self.fd = fd
        self.bitmap = bitmap
        self.onDisk = onDisk
        self.pageCount = onDisk.count / Self.pageSize
    }

    private static func bitsBytes(_ b: DirtyBitmap) -> Int {
        let bytes = Int((b.chunkCount + 7) / 8)
        return max(1, (bytes + pageSize - 1) / pageSize) * pageSize
    }

    private static func error(_ e: Syscalls.Errno, _ path: String, _ op: String) -> BlockError {
        BlockError(.io, "\(op) '\(path)': \(String(cString: strerror(e.rawValue)))", errno: e.rawValue, path: path, operation: op)
    }

    /// Opens the side file at `path` for `bitmap`, creating it when it does not exist (or
    /// was left uninitialized by a crash during creation). The bits of an existing file are
    /// ORed into `bitmap`.
    /// - Throws: `.invalidArgument` when the file belongs to another disk size or
    ///   granularity, `.corrupt` for a file that is not a side file, I/O errors.
    public static func open(path: String, bitmap: DirtyBitmap) async throws -> BitmapSideFile {
        let pool = IOThreadPool.shared
        let fd: Int32
        switch await pool.run({ Syscalls.open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o644) }) {
        case .success(let f): fd = f
        case .failure(let e): throw error(e, path, "open")
        }
        do {
            let bitsBytes = bitsBytes(bitmap)
            var head = [UInt8](repeating: 0, count: headerSize)
            let n = try await readAll(fd, &head, 0, path)
            if n == 0 || head.allSatisfy({ $0 == 0 }) {
                // New, or created but never initialized: nothing was dirty yet.
                let zeros = [UInt8](repeating: 0, count: bitsBytes)
                try await writeAll(fd, zeros, Int64(headerSize), path)
                try await writeAll(fd, encodeHeader(bitmap), 0, path)
                try await sync(fd, path)
                try await syncDirectory(of: path)
                return BitmapSideFile(path: path, fd: fd, bitmap: bitmap, onDisk: zeros)
            }
            guard n == headerSize, Array(head[0..<8]) == magic else {
                throw BlockError(.corrupt, "'\(path)' is not a bitmap side file", path: path, operation: "open")
            }
            guard le32(head, 8) == version, le32(head, 12) == UInt32(headerSize), le32(head, 32) == UInt32(pageSize) else {
                throw BlockError(.unsupported, "Unsupported bitmap side file version \(le32(head, 8))", path: path, operation: "open")
            }
            guard le64(head, 16) == UInt64(bitmap.size), le64(head, 24) == UInt64(bitmap.granularity) else {
                throw BlockError(.invalidArgument, "Bitmap side file '\(path)' is for a disk of \(le64(head, 16)) bytes with granularity "
                                 + "\(le64(head, 24)), not \(bitmap.size) and \(bitmap.granularity)", path: path, operation: "open")
            }
            var bits = [UInt8](repeating: 0, count: bitsBytes)
            _ = try await readAll(fd, &bits, Int64(headerSize), path)
            bits.withUnsafeBytes { bitmap.deserialize(firstChunk: 0, count: bitmap.chunkCount, from: $0) }
            return BitmapSideFile(path: path, fd: fd, bitmap: bitmap, onDisk: bits)
        } catch {
            Syscalls.close(fd)
            throw error
        }
    }

    /// Writes every page that gained 1 bits since it was last written (ORed with what the
    /// file holds) and syncs the file. Call it before a write's flush is reported complete.
    /// - Returns: the number of pages written.
    @discardableResult
    public func syncNewlyDirty() async throws -> Int {
        try await lock.withLock {
            let fd = try openFD()
            var pages: [Int] = []
            var visited = Set<Int>()
            let perPage = Int64(Self.pageSize) * 8
            var page = [UInt8](repeating: 0, count: Self.pageSize)
            var pos: Int64 = 0
            while let (o, l) = bitmap.nextDirtyArea(from: pos) {
                let firstPage = Int(o / bitmap.granularity / perPage)
                let lastPage = Int((o + l - 1) / bitmap.granularity / perPage)
                for p in firstPage...lastPage where p < pageCount && visited.insert(p).inserted {
                    serialize(page: p, into: &page)
                    let base = p * Self.pageSize
                    var gained = false
                    for i in 0..<Self.pageSize where page[i] & ~onDisk[base + i] != 0 {
                        gained = true
                        break
                    }
                    guard gained else { continue }
                    for i in 0..<Self.pageSize { onDisk[base + i] |= page[i] }
                    pages.append(p)
                }
                pos = o + l
            }
            guard !pages.isEmpty else { return 0 }
            for p in pages {
                let base = p * Self.pageSize
                try await Self.writeAll(fd, Array(onDisk[base..<base + Self.pageSize]), Int64(Self.headerSize + base), path)
            }
            try await Self.sync(fd, path)
            return pages.count
        }
    }

    /// Writes every page whose bits differ from the file (pages that lost bits, too) and
    /// syncs the file.
    /// - Returns: the number of pages written.
    @discardableResult
    public func writeBackClean() async throws -> Int {
        try await lock.withLock {
            let fd = try openFD()
            var page = [UInt8](repeating: 0, count: Self.pageSize)
            var written = 0
            for p in 0..<pageCount {
                serialize(page: p, into: &page)
                let base = p * Self.pageSize
                if onDisk[base..<base + Self.pageSize].elementsEqual(page) { continue }
                try await Self.writeAll(fd, page, Int64(Self.headerSize + base), path)
                onDisk.replaceSubrange(base..<base + Self.pageSize, with: page)
                written += 1
            }
            if written > 0 { try await Self.sync(fd, path) }
            return written
        }
    }

    /// Writes back every page and closes the file.
    public func close() async throws {
        guard fd >= 0 else { return }
        defer {
            Syscalls.close(fd)
            fd = -1
        }
        try await writeBackClean()
    }

    deinit {
        if fd >= 0 { Syscalls.close(fd) }
    }

    private func openFD() throws -> Int32 {
        guard fd >= 0 else { throw BlockError(.closed, "Bitmap side file is closed", path: path, operation: "sync bitmap") }
        return fd
    }

    private func serialize(page p: Int, into page: inout [UInt8]) {
        let perPage = Int64(Self.pageSize) * 8
        let first = Int64(p) * perPage
        let count = min(perPage, bitmap.chunkCount - first)
        for i in page.indices { page[i] = 0 }
        guard count > 0 else { return }
        page.withUnsafeMutableBytes { bitmap.serialize(firstChunk: first, count: count, into: $0) }
    }

    // MARK: - Encoding and I/O

    static func encodeHeader(_ b: DirtyBitmap) -> [UInt8] {
        var h = magic
        func le32(_ v: UInt32) { withUnsafeBytes(of: v.littleEndian) { h.append(contentsOf: $0) } }
        func le64(_ v: UInt64) { withUnsafeBytes(of: v.littleEndian) { h.append(contentsOf: $0) } }
        le32(version)
        le32(UInt32(headerSize))
        le64(UInt64(b.size))
        le64(UInt64(b.granularity))
        le32(UInt32(pageSize))
        h.append(contentsOf: [UInt8](repeating: 0, count: headerSize - h.count))
        return h
    }

    static func le32(_ b: [UInt8], _ at: Int) -> UInt32 {
        (0..<4).reduce(UInt32(0)) { $0 | UInt32(b[at + $1]) << (8 * UInt32($1)) }
    }

    static func le64(_ b: [UInt8], _ at: Int) -> UInt64 {
        (0..<8).reduce(UInt64(0)) { $0 | UInt64(b[at + $1]) << (8 * UInt64($1)) }
    }

    private static func readAll(_ fd: Int32, _ buf: inout [UInt8], _ offset: Int64, _ path: String) async throws -> Int {
        let count = buf.count
        let r: Result<([UInt8], Int), Syscalls.Errno> = await IOThreadPool.shared.run {
            var tmp = [UInt8](repeating: 0, count: count)
            let res = tmp.withUnsafeMutableBytes { Syscalls.pread(fd, $0.baseAddress!, count, offset) }
            return res.map { (tmp, $0) }
        }
        switch r {
        case .success(let (bytes, n)):
            buf = bytes
            return n
        case .failure(let e): throw error(e, path, "read")
        }
    }

    private static func writeAll(_ fd: Int32, _ bytes: [UInt8], _ offset: Int64, _ path: String) async throws {
        let r = await IOThreadPool.shared.run { bytes.withUnsafeBytes { Syscalls.pwrite(fd, $0.baseAddress!, bytes.count, offset) } }
        if case .failure(let e) = r { throw error(e, path, "write") }
    }

    private static func sync(_ fd: Int32, _ path: String) async throws {
        let r = await IOThreadPool.shared.run { Syscalls.fdatasync(fd) }
        if case .failure(let e) = r { throw error(e, path, "fdatasync") }
    }

    /// Makes the file's directory entry durable.
    private static func syncDirectory(of path: String) async throws {
        let dir = path.contains("/") ? String(path[..<path.lastIndex(of: "/")!]) : "."
        let r: Result<Void, Syscalls.Errno> = await IOThreadPool.shared.run {
            switch Syscalls.open(dir.isEmpty ? "/" : dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC) {
            case .success(let dfd):
                defer { Syscalls.close(dfd) }
                return Syscalls.fdatasync(dfd)
            case .failure(let e): return .failure(e)
            }
        }
        if case .failure(let e) = r { throw error(e, path, "sync directory") }
    }
}
