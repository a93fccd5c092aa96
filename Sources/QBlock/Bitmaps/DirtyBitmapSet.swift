import QBlockCore
/// The dirty bitmaps attached to one node, by name; writes through the node mark every
/// enabled bitmap in it. Thread-safe; marking takes one lock per bitmap.
// @unchecked: `list` is only touched with `lock` held; the DirtyBitmaps in it are thread-safe
// themselves.
public final class DirtyBitmapSet: @unchecked Sendable {
    private let lock = PosixMutex()
    private var list: [DirtyBitmap] = []

    /// Creates an empty set.
    public init() {}

    /// The bitmaps in the order they were added.
    public var all: [DirtyBitmap] { lock.withLock { list } }
    /// Whether the node has no dirty bitmaps.
    public var isEmpty: Bool { lock.withLock { list.isEmpty } }

    /// The bitmap called `name`, if any.
    public func named(_ name: String) -> DirtyBitmap? {
        lock.withLock { list.first { $0.name == name } }
    }

    /// Adds `bitmap`.
    /// - Throws: `.invalidArgument` "Bitmap already exists: NAME" if the name is taken.
    public func add(_ bitmap: DirtyBitmap) throws {
        try lock.withLock {
            if !bitmap.name.isEmpty, list.contains(where: { $0.name == bitmap.name }) {
                throw BlockError(.invalidArgument, "Bitmap already exists: \(bitmap.name)", operation: "add bitmap")
            }
            list.append(bitmap)
        }
    }

    /// Removes and returns the bitmap `bitmap` (by identity).
    @discardableResult
    public func remove(_ bitmap: DirtyBitmap) -> Bool {
        lock.withLock {
            guard let i = list.firstIndex(where: { $0 === bitmap }) else { return false }
            list.remove(at: i)
            return true
        }
    }

    /// Marks `[offset, offset+length)` in every enabled bitmap (called after a write,
    /// write-zeroes or discard completes at the node).
    @inline(__always)
    public func mark(offset: Int64, length: Int64) {
        let bitmaps = lock.withLock { list }
        for b in bitmaps { b.mark(offset: offset, length: length) }
    }

    /// Resizes every bitmap (the node was truncated or grown).
    public func resize(to size: Int64) {
        for b in all { b.resize(to: size) }
    }
}
