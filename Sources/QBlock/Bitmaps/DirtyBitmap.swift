import QBlockCore
/// A dirty bitmap: one bit per `granularity` bytes of a disk, set when those bytes are
/// written (QEMU's `BdrvDirtyBitmap` over an `HBitmap`).
///
/// Two levels: `words` holds the bits (bit `i` of the disk is bit `i % 64` of word `i / 64`),
/// and `summary` has one bit per word that is non-zero, so finding the next dirty area
/// skips 4096 clean chunks per summary word. Every method takes the bitmap's lock; all
/// are safe from any thread and never suspend.
///
/// Byte ranges are widened to whole chunks when marking (a partial chunk is dirty) and
/// narrowed when resetting only by the caller's choice: ``reset(offset:length:)`` clears
/// every chunk the range touches, as QEMU's `bdrv_reset_dirty_bitmap` does, so callers
/// reset exactly the chunks they copied.
// @unchecked: every var (size, words, summary, counters, flags) is only touched with `lock` held;
// `name` and `granularity` are immutable.
public final class DirtyBitmap: @unchecked Sendable {
    /// The bitmap's name (unique per node; may be empty for a job's private bitmap).
    public let name: String
    /// Bytes covered by one bit; a power of two, at least 512.
    public let granularity: Int64
    private let lock = PosixMutex()
    private var _size: Int64
    private var words: [UInt64]
    private var summary: [UInt64]
    private var dirtyChunks: Int64 = 0
    private var _enabled = true
    private var _persistent = false
    private var _inconsistent = false
    private var _busy = false

    /// - Parameters:
    ///   - size: the disk size in bytes the bitmap covers.
    ///   - granularity: bytes per bit, a power of two from 512 to 2 GiB.
    /// - Throws: ``BlockError`` `.invalidArgument` for a bad granularity.
    public init(name: String, size: Int64, granularity: Int64 = 65536) throws {
        guard granularity >= 512, granularity <= (1 << 31), granularity & (granularity - 1) == 0 else {
            throw BlockError(.invalidArgument, "Granularity must be power of 2 between 512 and 2147483648", operation: "add bitmap")
        }
        guard size >= 0 else { throw BlockError(.invalidArgument, "negative bitmap size", operation: "add bitmap") }
        self.name = name
        self.granularity = granularity
        self._size = size
        let chunks = Self.chunkCount(size, granularity)
        words = [UInt64](repeating: 0, count: Int((chunks + 63) / 64))
        summary = [UInt64](repeating: 0, count: (words.count + 63) / 64)
    }

    private init(validatedName: String, size: Int64, granularity: Int64) {
        self.name = validatedName
        self.granularity = granularity
        self._size = size
        words = []
        summary = []
    }

    private static func chunkCount(_ size: Int64, _ g: Int64) -> Int64 { (size + g - 1) / g }

    // MARK: - Properties

    /// The disk size covered.
    public var size: Int64 { lock.withLock { _size } }
    /// Number of chunks (bits).
    public var chunkCount: Int64 { lock.withLock { Self.chunkCount(_size, granularity) } }
    /// Dirty bytes, as QEMU's `count`: dirty chunks × granularity, capped at the disk size.
    public var dirtyBytes: Int64 {
        lock.withLock { dirtyBytesLocked() }
    }
    private func dirtyBytesLocked() -> Int64 {
        guard dirtyChunks > 0 else { return 0 }
        var bytes = dirtyChunks * granularity
        let chunks = Self.chunkCount(_size, granularity)
        // The last chunk may be partial.
        if chunks > 0, getLocked(chunks - 1) { bytes -= chunks * granularity - _size }
        return bytes
    }
    /// Whether writes mark the bitmap (`block-dirty-bitmap-enable` / `-disable`).
    public var isEnabled: Bool {
        get { lock.withLock { _enabled } }
        set { lock.withLock { _enabled = newValue } }
    }
    /// Whether the bitmap is stored in the image (qcow2 bitmaps extension) on close.
    public var isPersistent: Bool {
        get { lock.withLock { _persistent } }
        set { lock.withLock { _persistent = newValue } }
    }
    /// Found marked in-use on open: the image was not closed cleanly, so the content
    /// cannot be trusted (QEMU's `inconsistent`); such a bitmap may only be removed.
    public var isInconsistent: Bool {
        get { lock.withLock { _inconsistent } }
        set { lock.withLock { _inconsistent = newValue } }
    }
    /// In use by an operation (a job or an export) that must keep it unchanged by the user.
    public var isBusy: Bool {
        get { lock.withLock { _busy } }
        set { lock.withLock { _busy = newValue } }
    }

    // MARK: - Bits

    @inline(__always) private func getLocked(_ chunk: Int64) -> Bool {
        words[Int(chunk >> 6)] & (1 << UInt64(chunk & 63)) != 0
    }

    /// True if the chunk holding byte `offset` is dirty.
    public func isDirty(at offset: Int64) -> Bool {
        lock.withLock {
            guard offset >= 0, offset < _size else { return false }
            return getLocked(offset / granularity)
        }
    }

    /// Marks every chunk touched by `[offset, offset+length)`, if the bitmap is enabled
    /// (writes) or when `force` is set (merges, loading, jobs).
    public func mark(offset: Int64, length: Int64, force: Bool = false) {
        lock.withLock {
            guard _enabled || force else { return }
            setRangeLocked(offset, length, true)
        }
    }

    /// Clears every chunk touched by `[offset, offset+length)`.
    public func reset(offset: Int64, length: Int64) {
        lock.withLock { setRangeLocked(offset, length, false) }
    }

    /// Clears the whole bitmap (`block-dirty-bitmap-clear`).
    public func clear() {
        lock.withLock {
            for i in words.indices { words[i] = 0 }
            for i in summary.indices { summary[i] = 0 }
            dirtyChunks = 0
        }
    }

    /// Marks everything.
    public func markAll() {
        lock.withLock { setRangeLocked(0, _size, true) }
    }

    private func setRangeLocked(_ offset: Int64, _ length: Int64, _ value: Bool) {
        let start = max(0, offset)
        let end = min(_size, offset &+ length)
        guard length > 0, start < end else { return }
        var c = start / granularity
        let last = (end - 1) / granularity
        while c <= last {
            let w = Int(c >> 6)
            let bit = Int(c & 63)
            let n = Int(min(Int64(64 - bit), last - c + 1))
            let mask: UInt64 = n == 64 ? ~0 : ((1 << UInt64(n)) - 1) << UInt64(bit)
            let old = words[w]
            let new = value ? old | mask : old & ~mask
            if old != new {
                dirtyChunks += Int64(new.nonzeroBitCount) - Int64(old.nonzeroBitCount)
                words[w] = new
                let s = w >> 6, sb = UInt64(w & 63)
                if new != 0 { summary[s] |= 1 << sb } else { summary[s] &= ~(1 << sb) }
            }
            c += Int64(n)
        }
    }

    /// The first dirty byte range at or after `offset` and before `offset + maxLength`
    /// (whole chunks, clipped to the disk and to that window), or nil if none.
    public func nextDirtyArea(from offset: Int64, maxLength: Int64 = .max) -> (offset: Int64, length: Int64)? {
        lock.withLock {
            let limit = maxLength >= _size - offset ? _size : offset + max(0, maxLength)
            guard offset < limit, let first = nextLocked(from: max(0, offset) / granularity, dirty: true) else { return nil }
            let startByte = max(offset, first * granularity)
            guard startByte < limit else { return nil }
            let endChunk = nextLocked(from: first, dirty: false) ?? Self.chunkCount(_size, granularity)
            let endByte = min(limit, endChunk * granularity)
            return (startByte, endByte - startByte)
        }
    }

    /// The first chunk index at or after `chunk` whose bit equals `dirty`, or nil.
    private func nextLocked(from chunk: Int64, dirty: Bool) -> Int64? {
        let chunks = Self.chunkCount(_size, granularity)
        guard chunk < chunks else { return nil }
        var w = Int(chunk >> 6)
        var word = (dirty ? words[w] : ~words[w]) & (~0 << UInt64(chunk & 63))
        while true {
            if word != 0 {
                let c = Int64(w) * 64 + Int64(word.trailingZeroBitCount)
                return c < chunks ? c : nil
            }
            w += 1
            guard w < words.count else { return nil }
            if dirty {
                // Skip clean words through the summary level.
                var s = w >> 6
                var sword = summary[s] & (~0 << UInt64(w & 63))
                while sword == 0 {
                    s += 1
                    guard s < summary.count else { return nil }
                    sword = summary[s]
                }
                w = s * 64 + sword.trailingZeroBitCount
                guard w < words.count else { return nil }
                word = words[w]
            } else {
                word = ~words[w]
            }
        }
    }

    // MARK: - Whole-bitmap operations

    /// ORs `other` into this bitmap (`block-dirty-bitmap-merge`); both must cover the
    /// same size. Granularities may differ: each dirty area of `other` marks the chunks
    /// it touches here.
    /// - Throws: `.invalidArgument` when the sizes differ.
    public func merge(from other: DirtyBitmap) throws {
        guard other !== self else { return }
        guard other.size == size else {
            throw BlockError(.invalidArgument, "Bitmaps are incompatible and can't be merged", operation: "merge bitmap")
        }
        var off: Int64 = 0
        while let (o, l) = other.nextDirtyArea(from: off) {
            mark(offset: o, length: l, force: true)
            off = o + l
        }
    }

    /// A copy with the same bits, granularity and flags (for transactions and jobs).
    public func copy(name: String? = nil) -> DirtyBitmap {
        lock.withLock {
            let b = DirtyBitmap(validatedName: name ?? self.name, size: _size, granularity: granularity)
            b.words = words
            b.summary = summary
            b.dirtyChunks = dirtyChunks
            b._enabled = _enabled
            b._persistent = _persistent
            return b
        }
    }

    /// Changes the covered size (the disk was resized): new chunks are clean.
    public func resize(to newSize: Int64) {
        lock.withLock {
            let oldChunks = Self.chunkCount(_size, granularity)
            let chunks = Self.chunkCount(newSize, granularity)
            if chunks < oldChunks { setRangeLocked(chunks * granularity, (oldChunks - chunks) * granularity, false) }
            _size = newSize
            words.removeLast(max(0, words.count - Int((chunks + 63) / 64)))
            words.append(contentsOf: repeatElement(0, count: max(0, Int((chunks + 63) / 64) - words.count)))
            summary = [UInt64](repeating: 0, count: (words.count + 63) / 64)
            for (i, w) in words.enumerated() where w != 0 { summary[i >> 6] |= 1 << UInt64(i & 63) }
        }
    }

    // MARK: - Serialization (QEMU's on-disk layout)

    /// The bits of chunks `[firstChunk, firstChunk + count)` in QEMU's on-disk order
    /// (bit `j` of the run is bit `j % 8` of byte `j / 8`), written into `out`, which must
    /// hold `(count + 7) / 8` bytes. Used by qcow2's bitmap directory code and by tests.
    public func serialize(firstChunk: Int64, count: Int64, into out: UnsafeMutableRawBufferPointer) {
        lock.withLock {
            let n = Int((count + 7) / 8)
            precondition(out.count >= n, "serialize buffer too small")
            for i in 0..<n { out[i] = 0 }
            var c = nextLocked(from: firstChunk, dirty: true)
            while let cc = c, cc < firstChunk + count {
                let j = Int(cc - firstChunk)
                out[j >> 3] |= UInt8(1 << (j & 7))
                c = nextLocked(from: cc + 1, dirty: true)
            }
        }
    }

    /// Sets bits from `bytes` in QEMU's on-disk order for chunks starting at `firstChunk`
    /// (bits past the bitmap's end are ignored). Bits are ORed in.
    public func deserialize(firstChunk: Int64, count: Int64, from bytes: UnsafeRawBufferPointer) {
        lock.withLock {
            let chunks = Self.chunkCount(_size, granularity)
            let n = min(count, chunks - firstChunk, Int64(bytes.count) * 8)
            guard n > 0 else { return }
            var j: Int64 = 0
            while j < n {
                let byte = bytes[Int(j >> 3)]
                if byte == 0 && j & 7 == 0 { j += 8; continue }
                if byte & UInt8(1 << (j & 7)) != 0 {
                    setRangeLocked((firstChunk + j) * granularity, granularity, true)
                }
                j += 1
            }
        }
    }

    /// Whether any chunk in `[firstChunk, firstChunk + count)` is dirty (qcow2 stores
    /// all-zero bitmap clusters as zero entries).
    public func anyDirty(firstChunk: Int64, count: Int64) -> Bool {
        lock.withLock {
            guard let c = nextLocked(from: firstChunk, dirty: true) else { return false }
            return c < firstChunk + count
        }
    }
}

extension DirtyBitmap {
    /// QEMU's error for a bitmap that cannot be used now (`bdrv_dirty_bitmap_check`): busy
    /// in another operation, or inconsistent (found in use on open); nil when it may be used.
    /// - Parameter allowReadOnly: whether a read-only use is meant (export, merge source);
    ///   QEMU then also accepts a read-only bitmap, which this library never has.
    public func useError(allowReadOnly: Bool = false) -> BlockError? {
        if isBusy {
            return BlockError(.busy, "Bitmap '\(name)' is currently in use by another operation and cannot be used",
                              operation: "use bitmap")
        }
        if isInconsistent {
            return BlockError(.invalidArgument, "Bitmap '\(name)' is inconsistent and cannot be used\n"
                              + "Try block-dirty-bitmap-remove to delete this bitmap from disk", operation: "use bitmap")
        }
        return nil
    }
}
