import QBlockBitmaps
import QBlockCore
/// Capability protocols: what a node can do besides the byte-offset I/O of ``BlockDriver``.
///
/// Code that needs a capability asks for the protocol (`node as? any InternalSnapshotting`),
/// never for a concrete driver type, so that adding a format is a folder and one line in
/// ``FormatRegistry/builtIn``. Each driver declares the protocols it has in its own folder.
/// A protocol has no default implementation that silently does nothing: a node that cannot
/// do something does not conform, and the caller reports QEMU's error for it.
///
/// Format-level capabilities (creating, measuring, opening) are on the format's
/// ``FormatDriver`` type; the protocols here are on open nodes. ``BlockFilter`` and
/// ``ClusteredFormat`` are in `BlockDriver.swift`, ``ReopenableDriver`` below.

// MARK: Backing files

/// A format with a backing file whose link can be changed while open (qcow2): live
/// snapshots, stream, commit, rebase and mirror pivots re-link the chain.
public protocol BackingLinked: BlockDriver {
    /// The backing file name recorded in the image, if any (it may not be open).
    var backingFileName: String? { get }
    /// The backing file's format recorded in the image, if any.
    var backingFormat: String? { get }
    /// Replaces the node reads fall through to for unallocated data. Call only while no
    /// request is in flight on this node (inside a drained section).
    func setBackingNode(_ node: (any BlockDriver)?)
    /// Replaces the backing node as ``setBackingNode(_:)`` does, after waiting for the
    /// format's metadata operations in flight (qcow2's metadata lock is held for the
    /// change): for a job that re-links an image other requests may still be reaching.
    func relinkBacking(to node: (any BlockDriver)?) async
    /// Rewrites the backing file name (nil: none) and format recorded in the image
    /// (`qemu-img rebase -u`); the open backing node is not changed.
    /// - Throws: ``BlockError`` (read-only image, a name too long for the header, I/O).
    func setBackingFile(_ name: String?, format: String?) async throws
}

/// An image that can drop everything it allocates, so that its backing file shows through
/// everywhere (QEMU's `bdrv_make_empty`, what `qemu-img commit` does to the top image).
public protocol Emptiable: BlockDriver {
    /// Makes every guest cluster unallocated.
    /// - Throws: ``BlockError`` `.readOnly` on a read-only node, I/O errors.
    func makeEmpty() async throws
}

// MARK: Internal snapshots

/// A format that keeps snapshots of the disk inside the image (qcow2's snapshot table;
/// `qemu-img snapshot`, `blockdev-snapshot-internal-sync`, `convert -l`).
///
/// Snapshot operations change the format's metadata as a whole: callers must have no
/// other request running on the node meanwhile (a drained section).
public protocol InternalSnapshotting: BlockDriver {
    /// The snapshots, in table order.
    var internalSnapshots: [SnapshotInfo] { get }
    /// The snapshot with this id and/or name (both must match when both are given).
    func findInternalSnapshot(id: String?, name: String?) -> SnapshotInfo?
    /// Creates a disk-only snapshot of the current content, dated now, with the next free id.
    /// - Parameter icount: the instruction count stored with it (nil: none).
    /// - Throws: ``BlockError`` (read-only node, name too long, too many snapshots, I/O).
    @discardableResult
    func createInternalSnapshot(name: String, icount: UInt64?) async throws -> SnapshotInfo
    /// Reverts the disk to a snapshot (`qemu-img snapshot -a`), matched by id, then name.
    func applySnapshot(idOrName: String) async throws
    /// Deletes a snapshot, matched by name, then id.
    /// - Throws: ``BlockError`` `.notFound` "snapshot not found", `.readOnly`, I/O errors.
    func deleteSnapshot(idOrName: String) async throws
    /// A read-only node showing a snapshot's content (`qemu-img convert -l`), without
    /// switching this node; keep this node open while the reader is used.
    /// - Parameters:
    ///   - id: the id to match; with `name`, both must match.
    ///   - name: the name to match.
    ///   - orName: when nothing matched `id`/`name`, a name to try (`-l NAME` tries ids, then names).
    /// - Throws: ``BlockError`` `.notFound` "Can't find snapshot".
    func internalSnapshotReader(id: String?, name: String?, orName: String?) async throws -> any BlockDriver
}

// MARK: Persistent dirty bitmaps

/// A format that stores dirty bitmaps in the image (qcow2 v3's bitmaps extension): they are
/// loaded at open, marked by every write through the node, and stored at close.
///
/// Whether a bitmap may be used now (not busy, not inconsistent) is the bitmap's own
/// business: ``DirtyBitmap/useError(allowReadOnly:)`` (QEMU's `bdrv_dirty_bitmap_check`).
public protocol PersistentBitmapStore: BlockDriver {
    /// The bitmaps loaded from or to be stored in the image.
    var persistentBitmaps: DirtyBitmapSet { get }
    /// Whether this image can hold persistent bitmaps at all (QEMU's
    /// `bdrv_supports_persistent_dirty_bitmap`; false for a qcow2 v2 image).
    var supportsPersistentBitmaps: Bool { get }
    /// QEMU's warning, without the program name, when the image's bitmaps were found
    /// modified by a program without bitmap support and are ignored (nil otherwise);
    /// tools print it at every open. Its last line has no newline.
    var staleBitmapsWarning: String? { get }
    /// Adds a persistent bitmap, stored at close (or at ``storePersistentBitmaps()``).
    /// - Parameters:
    ///   - granularity: bytes per bit; nil: the format's default.
    ///   - disabled: create it disabled (writes do not mark it).
    ///   - nodeName: the node's name in error messages.
    /// - Returns: the new bitmap, already in ``persistentBitmaps``.
    /// - Throws: ``BlockError`` with QEMU's messages (name, granularity, limits, v2 image).
    @discardableResult
    func addPersistentBitmap(name: String, granularity: Int64?, disabled: Bool, nodeName: String?) throws -> DirtyBitmap
    /// Removes a persistent bitmap from the node and at once from the image.
    /// - Throws: `.notFound` "Dirty bitmap 'NAME' not found", `.busy`, I/O errors.
    func removePersistentBitmap(named name: String) async throws
    /// Writes every persistent, consistent bitmap into the image now.
    func storePersistentBitmaps() async throws
}

// MARK: Image maintenance

/// A format whose options can be changed in an existing image (`qemu-img amend`).
public protocol Amendable: BlockDriver {
    /// Applies `-o` options (`key=value` pairs in command-line order), as qemu-img amend does.
    /// - Throws: ``BlockError`` worded as qemu-img's messages (unknown or creation-only
    ///   options, invalid values, changes the image cannot take).
    func amend(options: [(String, String)]) async throws
}

/// A format with a consistency check and repair (`qemu-img check [-r leaks|all]`).
public protocol Checkable: BlockDriver {
    /// Checks the image's metadata and, with `repair`, fixes what it may.
    /// - Throws: ``BlockError`` when the check itself cannot run (I/O errors).
    func check(repair: CheckRepair?) async throws -> CheckResult
}

// MARK: Writing

/// A format that can store clusters compressed (`qemu-img convert -c`, `qemu-io write -c`).
/// Compressed writes cover whole clusters and cannot overwrite allocated ones.
public protocol CompressedWriting: ClusteredFormat {
    /// A compressor for this image's algorithm and cluster size, so that callers can
    /// compress many clusters concurrently and write them in order.
    func makeClusterCompressor() throws -> any ClusterCompressor
    /// Compresses and writes one guest cluster (the last may be short at the end of the image).
    func writeCompressedCluster(at guestOffset: Int64, data: UnsafeRawBufferPointer) async throws
    /// Writes one cluster compressed by a compressor of ``makeClusterCompressor()``;
    /// `compressed` nil (compression did not shrink it) writes `data` normally.
    func writePrecompressedCluster(at guestOffset: Int64, data: UnsafeRawBufferPointer,
                                   compressed: UnsafeRawBufferPointer?) async throws
    /// After the last compressed write: pads the file as QEMU does at the end of `convert -c`.
    func finishCompressedWrites() async throws
}

/// A format that keeps a VM state (a machine's RAM and devices, saved with an internal
/// snapshot) beside the disk, past the guest-visible end (QEMU's `bdrv_save_vmstate` and
/// `bdrv_load_vmstate`; qemu-io's `write -b` and `read -b`). Positions count from the start
/// of the VM state area; requests there are not limited by the virtual size.
public protocol VMStateStoring: BlockDriver {
    /// Writes `buffer` at `position` of the VM state area.
    /// - Throws: ``BlockError`` `.readOnly`, `.invalidArgument` for a negative position or an
    ///   area the format cannot address, I/O errors.
    func writeVMState(at position: Int64, from buffer: UnsafeRawBufferPointer) async throws
    /// Reads `buffer.count` bytes at `position` of the VM state area (zeros where nothing
    /// was written).
    /// - Throws: ``BlockError`` `.invalidArgument` for a negative position, I/O errors.
    func readVMState(at position: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws
}

/// A format that allocates space in its file as writes arrive, so that the order of
/// allocating writes decides the image's layout (qcow2). A writer that wants qemu-img's
/// layout issues its writes in order, and may let the next one start as soon as this
/// one's space is allocated.
public protocol AllocatingFormat: BlockDriver {
    /// Writes like ``BlockDriver/write(at:from:flags:)``, calling `placed` once every
    /// cluster of the request has its host offset, before the data is written (not called
    /// when the request fails before that point).
    func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags,
               placed: (() -> Void)?) async throws
}

/// A format whose data runs may be holes in its file (qcow2 with preallocated metadata):
/// block-status walkers ask the file, at the run's host offset, whether the run reads as
/// zeros (QEMU's `BDRV_BLOCK_RECURSE`).
public protocol BlockStatusRecursing: BlockDriver {
    /// Whether data runs should be looked up in the file as well.
    var recursesBlockStatusIntoFile: Bool { get }
}

/// A filter whose block status queries can fail by themselves (blkdebug's injected
/// `block-status` errors). Code that looks through filters for the status of the content
/// below (``BlockDriver/skippingFilters``) asks each such filter first, as QEMU's status
/// query passes through every filter's own callback.
public protocol BlockStatusChecking: BlockFilter {
    /// Throws what a block status query of `length` bytes at `offset` through this filter
    /// would fail with; returns when it would pass through.
    func checkBlockStatus(at offset: Int64, length: Int64) throws
}

/// A format that shows its file's bytes unchanged (raw): it shares resizing with its file,
/// reports status past its end itself, and has driver information only when its file has.
public protocol PassThroughFormat: BlockDriver {
    /// The protocol node whose bytes it shows.
    var passedThrough: any BlockDriver { get }
}

// MARK: Information

/// A format with driver information (`qemu-img info`, `query-block`, qemu-io's `info`;
/// QEMU's `bdrv_get_info` and `bdrv_get_specific_info`).
public protocol FormatInfoReporting: BlockDriver {
    /// Cluster size, VM state offset and the dirty flag.
    var driverInfo: DriverInfo { get }
    /// QAPI's `ImageInfoSpecific`: `{"type": FORMAT, "data": {...}}`.
    var formatSpecificInfo: QObject.Dict { get }
    /// The format-specific information as qemu-io's `info` prints it: label and value
    /// pairs, in its order.
    var formatSpecificSummary: [(label: String, value: String)] { get }
}

// MARK: Protocol nodes

/// A protocol node over host storage, a file or a block device (QEMU's `file-posix`): it
/// knows how much of it is allocated, whether a new image on it reads zeros, answers
/// `bdrv_get_info`, and takes QEMU's image locks.
public protocol HostStorage: BlockDriver {
    /// Bytes allocated on the host (`qemu-img info`'s disk size).
    var allocatedSize: Int64 { get }
    /// A block device (no zero initialization, no growth, no holes).
    var isBlockDevice: Bool { get }
    /// Takes QEMU-compatible image locks: `perm` held, `shared` allowed to others.
    /// - Throws: ``BlockError`` `.locked` when another process holds a conflicting lock.
    func lock(perm: BlockPermissions, shared: BlockPermissions) throws
}

/// A protocol node that reaches its storage over a connection to a server (an NBD
/// export): the server owns the image, so there are no image locks, no allocated size and
/// no driver information (QEMU's nbd driver answers neither).
public protocol NetworkStorage: BlockDriver {
    /// The name of the export on the server (its ``BlockDriver/filename`` is the whole URI).
    var exportName: String { get }
}

/// A driver whose open mode can change while its node keeps its place in the graph
/// (QEMU's `bdrv_reopen` of one node): every user, backing link and job keeps the same
/// node object. Callers switch a tree top-down when making it read-only and bottom-up
/// when making it writable, with no request in flight (inside ``BlockGraph/drained(_:)``).
public protocol ReopenableDriver: BlockDriver {
    /// Makes the driver read-only (after flushing what it caches) or writable again, and
    /// takes `cache` as its host cache mode where it has one (a format driver has none:
    /// its file node has).
    /// - Throws: ``BlockError``; on failure the driver keeps its previous mode.
    func reopen(readOnly: Bool, cache: CacheMode) async throws
}
