#if canImport(Glibc)
import Glibc
#endif
import QBlockCore
import QBlockGraph

/// The dirty bit, and what happens to an image dropped without ``Qcow2Node/close()``.
///
/// A qcow2 node keeps metadata in memory: the L2 and refcount caches are written back at
/// a flush or a close, persistent dirty bitmaps are stored at a close. An image that is
/// never closed would lose all of it with the process, and the file left behind would look
/// clean (`qemu-img check` finds nothing wrong with clusters nobody references) while
/// every write since the last flush is gone.
///
/// What this implementation does is what a QEMU user already knows from an unclean
/// shutdown, and no more surprising than that:
///
/// 1. **The dirty bit, as QEMU sets it.** With lazy refcounts (v3 images; incompatible
///    feature bit 0), before the first change to cached metadata the bit is written and
///    flushed (``markDirtyBeforeMetadataChange()``, as QEMU's `qcow2_mark_dirty`); a clean
///    ``Qcow2Node/close()``, a read-only reopen, or a repairing check that finds the image
///    consistent clears it again, and the next read-write open — ours or QEMU's — repairs
///    the refcounts of an image left dirty. Without lazy refcounts no bit is set, as in
///    QEMU: the caches write refcount blocks before the L2 tables that depend on them, so
///    the file is consistent at every moment (at worst clusters leak), and an image whose
///    process died reads as it was at its last flush, for `qemu-img check` as for ours.
/// 2. **A node deinitialized without close writes its cached metadata back** when its file
///    can be written synchronously (``SynchronousWriteTarget``, a `file` node that is still
///    open): dirty refcount blocks and L2 tables go to disk in the order the caches'
///    dependencies require, then the file is synced. Writes acknowledged before the drop then
///    read back after it, as they would have after a close. It cannot `await`, so it does
///    nothing else: persistent bitmaps stay marked in use (QEMU treats them as
///    inconsistent), deferred frees stay leaks, and with lazy refcounts the dirty bit stays
///    set, so the image is still reported as not closed cleanly. When the write-back is not possible (the file
///    node was closed first, an NBD file, a failing disk), the metadata is lost as in a crash:
///    the on-disk image is consistent (the caches' ordering leaves at worst leaks; with lazy
///    refcounts the dirty bit says what happened).
/// 3. **Debug builds print one line on stderr** for every such drop, naming the file, so
///    that the missing `close()` is found where it happens.
///
/// Not done on purpose: a flush in the background (a task started by `deinit` could still
/// be writing when the caller reopens the file, and would hold its lock meanwhile), and
/// blocking `deinit` on an asynchronous flush (which can deadlock Swift's cooperative pool).
extension Qcow2Node {
    /// The dirty bit as QEMU reports it for an open image (`dirty-flag` in `query-block`,
    /// "cleanly shut down: no" in `qemu-img info`): set when the image was left dirty, not
    /// for the mark this session itself sets while it writes (QEMU without lazy refcounts
    /// sets none).
    public var dirtyFlag: Bool { isDirty && !dirtyMarkedHere }

    /// Sets the dirty bit on disk (written and flushed) unless it is set: called with the lock
    /// held before any change to the L2 or refcount caches.
    /// - Throws: the I/O error of the header write or flush; nothing was changed then.
    func markDirtyBeforeMetadataChange() async throws {
        // As QEMU: only lazy refcounts need the bit. Without them the caches' write order
        // keeps the on-disk image consistent at every moment (at worst leaked clusters), so
        // a killed process leaves an image that is clean as far as qemu-img check can tell,
        // and QEMU's own tests (iotests 039) expect the bit clear after such a kill.
        if !useLazyRefcounts { return }
        if header.version < 3 || isDirty || isReadOnly { return }
        header.incompatibleFeatures |= Qcow2Header.Incompatible.dirty
        do {
            try await writeIncompatibleFeatures()
            try await hostFile.flush()
        } catch {
            header.incompatibleFeatures &= ~Qcow2Header.Incompatible.dirty
            throw error
        }
        dirtyMarkedHere = true
    }

    /// Clears the dirty bit this session set, once everything is on disk. Lock held.
    func markCleanLocked() async throws {
        guard dirtyMarkedHere else { return }
        if isDirty { try await clearDirtyBitLocked() }
        dirtyMarkedHere = false
    }

    /// Clears the dirty bit on disk (QEMU's `qcow2_mark_clean`). Lock held; every metadata
    /// change must already be on disk.
    func clearDirtyBitLocked() async throws {
        header.incompatibleFeatures &= ~Qcow2Header.Incompatible.dirty
        do {
            try await writeIncompatibleFeatures()
            try await hostFile.flush()
        } catch {
            header.incompatibleFeatures |= Qcow2Header.Incompatible.dirty
            throw error
        }
    }

    /// Writes the header's incompatible-features field alone (v3, offset 72).
    private func writeIncompatibleFeatures() async throws {
        var field: [UInt8] = []
        field.appendBE64(header.incompatibleFeatures)
        try await hostFile.write(at: 72, bytes: field)
    }

    /// Called by `deinit`: see the type's documentation. No request can be in flight (each
    /// holds a reference to the node), so the caches are touched without the lock.
    func droppedWithoutClose() {
        guard gate.isOpen, !isReadOnly else { return }
        let tables = l2Cache.dirtyCount + refcountCache.dirtyCount
        let bitmapsInUse = bitmapDirectory.contains { $0.flags.contains(.inUse) }
        guard tables > 0 || dirtyMarkedHere || !pendingFrees.isEmpty || bitmapsInUse else { return }
        var outcome: String
        if tables == 0 {
            outcome = "no unflushed metadata tables"
        } else if let target = hostFile.innermostDriver as? SynchronousWriteTarget {
            do {
                // The order flush() uses: each cache writes the one it depends on first.
                try l2Cache.flushSynchronously(to: target)
                try refcountCache.flushSynchronously(to: target)
                try target.syncSynchronously()
                outcome = "\(tables) unflushed metadata tables written back now"
            } catch {
                let why = (error as? BlockError)?.code == .closed ? "its file node is closed" : "\(error)"
                outcome = "\(tables) unflushed metadata tables LOST (\(why)): writes since the last flush are gone"
            }
        } else {
            outcome = "\(tables) unflushed metadata tables LOST (the file cannot be written from deinit): writes since the last flush are gone"
        }
        #if DEBUG
        let mark = header.version >= 3 && isDirty ? "left marked dirty" : "not marked dirty (qcow2 v2)"
        let bitmaps = bitmapsInUse ? ", persistent bitmaps left in use" : ""
        StandardStream.error.write("qblock: warning: qcow2 image '\(filename)' deinitialized without close(): \(outcome); \(mark)\(bitmaps)\n")
        #else
        _ = outcome
        #endif
    }
}

extension Qcow2Node: FileSharingClose {}
