/// A node that can write and sync on the calling thread, without awaiting: what a format
/// node's `deinit` uses for its last-chance write-back of cached metadata (a `deinit` cannot
/// await, and blocking a cooperative thread on an async flush could deadlock the pool).
/// Only protocol nodes whose calls are plain system calls offer it (``FileNode``).
package protocol SynchronousWriteTarget: AnyObject {
    /// Writes all of `buffer` at `offset`, blocking the calling thread.
    func writeSynchronously(at offset: Int64, from buffer: UnsafeRawBufferPointer) throws
    /// Makes completed writes durable, blocking the calling thread.
    func syncSynchronously() throws
}
