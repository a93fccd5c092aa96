#if canImport(Glibc)
import Glibc
#endif
import QBlockCore
import QBlockGraph

/// A write-back cache of cluster-sized qcow2 metadata tables (L2 tables or refcount
/// blocks), like QEMU's `qcow2-cache.c`.
///
/// Dirty tables are written when the cache is flushed or a dirty entry is evicted.
/// Ordering between the two caches is kept by a *dependency*: before this cache writes
/// anything, the cache it depends on is written and the file synced. Allocation makes the
/// L2 cache depend on the refcount cache (a cluster is counted before it is referenced);
/// freeing makes the refcount cache depend on the L2 cache (a reference is dropped before
/// the count is). A process killed at any point therefore leaves at worst leaked clusters.
///
/// A write that fails (ENOSPC, EIO) leaves its table dirty: it is written again at the next
/// flush, and a dependency that could not be flushed stays in place. When the least recently
/// used table cannot be evicted because its write fails, a clean table is evicted instead, or
/// the cache grows (up to twice its capacity), so that lookups needed to undo a failed
/// allocation do not fail for want of room.
///
/// Not thread-safe: every call is made with the qcow2 metadata lock held.
package final class Qcow2MetadataCache {
    final class Entry {
        var offset: Int64 = -1
        let buffer: AlignedBuffer
        var dirty = false
        var lastUsed: UInt64 = 0
        var pins = 0
        /// SAFETY: `buffer` lives as long as the entry, and entries live as long as the cache.
        let ptr: UnsafeMutableRawPointer
        init(size: Int) {
            buffer = AlignedBuffer(count: size, alignment: 4096)
            ptr = buffer.unsafeBase
        }
        var bytes: UnsafeMutableRawBufferPointer { UnsafeMutableRawBufferPointer(start: ptr, count: buffer.count) }
    }

    let name: String
    let file: any BlockDriver
    let tableSize: Int
    private var entries: [Entry]
    private var index: [Int64: Entry] = [:]
    private var clock: UInt64 = 0
    /// The cache that must be written (and synced) before this one writes.
    var dependency: Qcow2MetadataCache?
    /// Called to sync the file after a dependency was flushed.
    var syncFile: () async throws -> Void = {}

    init(name: String, file: any BlockDriver, tableSize: Int, capacity: Int) {
        self.name = name
        self.file = file
        self.tableSize = tableSize
        baseCapacity = max(2, capacity)
        entries = (0..<baseCapacity).map { _ in Entry(size: tableSize) }
    }

    private var baseCapacity: Int
    var capacity: Int { entries.count }

    /// Empties the cache and gives it room for `capacity` tables (a reopen with new cache
    /// sizes, as QEMU replaces its caches). Every table must be written back first.
    /// - Throws: ``BlockError`` `.internalError` if a table is dirty or in use.
    func reset(capacity: Int) throws {
        if entries.contains(where: { $0.dirty || $0.pins > 0 }) {
            throw BlockError(.internalError, "\(name) cache: cannot resize with tables dirty or in use")
        }
        baseCapacity = max(2, capacity)
        index.removeAll()
        entries = (0..<baseCapacity).map { _ in Entry(size: tableSize) }
    }

    /// The table at `offset`, read from disk if not cached. The entry is pinned: call
    /// ``release(_:)`` when done if more cache calls follow before you stop using it.
    func get(_ offset: Int64) async throws -> Entry {
        if let e = index[offset] {
            clock += 1
            e.lastUsed = clock
            return e
        }
        let e = try await victim()
        if name == "L2" { await file.debugEvent(.l2Load) }
        try await file.read(at: offset, into: e.bytes)
        install(e, offset)
        return e
    }

    /// A table at `offset` that is new: zero-filled, not read, marked dirty.
    func getEmpty(_ offset: Int64) async throws -> Entry {
        let e: Entry
        if let cached = index[offset] {
            e = cached
        } else {
            e = try await victim()
            install(e, offset)
        }
        memset(e.ptr, 0, tableSize)
        e.dirty = true
        return e
    }

    private func install(_ e: Entry, _ offset: Int64) {
        e.offset = offset
        e.dirty = false
        clock += 1
        e.lastUsed = clock
        index[offset] = e
    }

    private func victim() async throws -> Entry {
        var best: Entry?
        for e in entries where e.pins == 0 {
            if e.offset < 0 { best = e; break }
            if best == nil || e.lastUsed < best!.lastUsed { best = e }
        }
        guard let v = best else {
            throw BlockError(.internalError, "\(name) cache: all entries pinned")
        }
        if v.offset >= 0 {
            if v.dirty {
                do {
                    try await flushDependency()
                    try await writeEntry(v)
                } catch {
                    // The table stays dirty for a later flush; find room elsewhere.
                    return try spareEntry(orThrow: error)
                }
            }
            evict(v)
        }
        return v
    }

    /// A clean unpinned entry (the least recently used), or a new one while the cache is
    /// below twice its capacity.
    private func spareEntry(orThrow error: Error) throws -> Entry {
        let clean = entries.filter { $0.pins == 0 && !$0.dirty }.min { $0.lastUsed < $1.lastUsed }
        if let c = clean {
            if c.offset >= 0 { evict(c) }
            return c
        }
        guard entries.count < 2 * baseCapacity else { throw error }
        let e = Entry(size: tableSize)
        entries.append(e)
        return e
    }

    private func evict(_ e: Entry) {
        index[e.offset] = nil
        e.offset = -1
    }

    func markDirty(_ e: Entry) { e.dirty = true }

    func pin(_ e: Entry) { e.pins += 1 }
    func release(_ e: Entry) { e.pins -= 1 }

    /// Forgets the table at `offset` without writing it (its cluster was freed).
    func discard(_ offset: Int64) {
        if let e = index[offset] {
            index[offset] = nil
            e.offset = -1
            e.dirty = false
        }
    }

    /// Makes this cache wait for `other` before writing (QEMU's `qcow2_cache_set_dependency`).
    ///
    /// Call it *before* making the change that needs the ordering: breaking an opposite
    /// dependency may write this cache's dirty tables right here.
    func setDependency(on other: Qcow2MetadataCache) async throws {
        if other.dependency != nil { try await other.flushDependency() }
        if let d = dependency, d !== other { try await flushDependency() }
        dependency = other
    }

    func flushDependency() async throws {
        guard let d = dependency else { return }
        try await d.flush()
        try await syncFile()
        dependency = nil
    }

    /// Writes every dirty table, after the dependency (always, even when this cache has
    /// nothing dirty: callers rely on "flushed" meaning the dependency is on disk too).
    /// Does not sync the file after its own writes.
    func flush() async throws {
        try await flushDependency()
        if !entries.contains(where: { $0.dirty && $0.offset >= 0 }) { return }
        for e in entries.sorted(by: { $0.offset < $1.offset }) where e.dirty && e.offset >= 0 {
            try await writeEntry(e)
        }
    }

    /// Tables modified in memory and not written yet.
    package var dirtyCount: Int { entries.filter { $0.dirty && $0.offset >= 0 }.count }

    /// ``flush()`` on the calling thread, for the node's `deinit` (which cannot await): the
    /// dependency first, then a sync, then this cache's dirty tables.
    func flushSynchronously(to target: SynchronousWriteTarget) throws {
        if let d = dependency {
            try d.flushSynchronously(to: target)
            try target.syncSynchronously()
            dependency = nil
        }
        for e in entries.sorted(by: { $0.offset < $1.offset }) where e.dirty && e.offset >= 0 {
            try target.writeSynchronously(at: e.offset, from: UnsafeRawBufferPointer(e.bytes))
            e.dirty = false
        }
    }

    private func writeEntry(_ e: Entry) async throws {
        await file.debugEvent(name == "L2" ? .l2Update : .refblockUpdatePart)
        try await file.write(at: e.offset, from: UnsafeRawBufferPointer(e.bytes), flags: [])
        e.dirty = false
    }

    /// Drops every entry (after a flush), e.g. when tables were rewritten behind the cache.
    func invalidateAll() {
        for e in entries {
            if e.offset >= 0 { index[e.offset] = nil }
            e.offset = -1
            e.dirty = false
        }
    }
}
