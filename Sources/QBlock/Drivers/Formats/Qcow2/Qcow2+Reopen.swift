import QBlockCore
import QBlockGraph
/// Switching an open image between read-only and read-write without reopening it (the
/// format side of QEMU's `bdrv_reopen`); the file below is switched by its own node
/// (``FileNode/reopen(readOnly:cache:)``).
extension Qcow2Node {
    /// Makes the image read-only: stores the persistent bitmaps (clearing their in-use
    /// flags), flushes the metadata caches and the file, clears the dirty bit this session
    /// set, then refuses writes. Call it with
    /// no write in flight, before the file goes read-only.
    /// - Throws: I/O errors from storing or flushing; the node then stays writable.
    public func reopenReadOnly() async throws {
        try gate.enter(filename, "reopen")
        defer { gate.leave() }
        if formatReadOnly.value { return }
        if hostFile.isReadOnly { formatReadOnly.set(true); return }   // nothing was writable
        try await metaLock.withLock { try await storeBitmapsLocked() }
        try await flushAdmitted()
        // Everything is on disk: the image is clean until it is written again.
        try await metaLock.withLock { try await markCleanLocked() }
        formatReadOnly.set(true)
    }

    /// Makes the image writable again once its file is: repairs an image left dirty,
    /// drops stale autoclear state and marks the persistent bitmaps in use, as a
    /// read-write open does.
    /// - Throws: `.readOnly` "Block node is read-only" when the file is read-only; I/O
    ///   errors (the node then stays read-only).
    public func reopenReadWrite() async throws {
        try gate.enter(filename, "reopen")
        defer { gate.leave() }
        if hostFile.isReadOnly { throw BlockError(.readOnly, "Block node is read-only", path: filename, operation: "reopen") }
        let was = formatReadOnly.value
        formatReadOnly.set(false)
        do {
            // As at open: no other user writes now (the caller drained them); check() takes the lock itself.
            try await prepareForWriting(options: OpenOptions())
        } catch {
            formatReadOnly.set(was)
            throw error
        }
    }
}
