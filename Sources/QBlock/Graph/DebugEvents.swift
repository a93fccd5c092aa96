/// The points in a format driver's work that a debugging node below it can react to (QAPI's
/// `BlkdebugEvent`): a qcow2 node reports `l2_update` to its `file` child just before it
/// writes an L2 table, `read_aio` before it reads guest data, and so on. The raw values are
/// QEMU's names, as blkdebug's configuration and `blockdev-add` spell them.
public enum BlkdebugEvent: String, CaseIterable, Sendable {
    // (Names as in QEMU's qapi/block-core.json; the Swift names are those in camel case.)
    /// An L1 table entry is written.
    case l1Update = "l1_update"
    /// Growing the L1 table: the new table is allocated.
    case l1GrowAllocTable = "l1_grow_alloc_table"
    /// Growing the L1 table: the new table is written.
    case l1GrowWriteTable = "l1_grow_write_table"
    /// Growing the L1 table: the header is switched to the new table.
    case l1GrowActivateTable = "l1_grow_activate_table"
    /// An L2 table is read from the image.
    case l2Load = "l2_load"
    /// An L2 table is written.
    case l2Update = "l2_update"
    /// An L2 table is written after a compressed write.
    case l2UpdateCompressed = "l2_update_compressed"
    /// Allocating an L2 table: the old table is read to copy it.
    case l2AllocCowRead = "l2_alloc_cow_read"
    /// Allocating an L2 table: the new table is written.
    case l2AllocWrite = "l2_alloc_write"
    /// Guest data is read from the image.
    case readAio = "read_aio"
    /// Guest data is read from the backing file.
    case readBackingAio = "read_backing_aio"
    /// A compressed cluster is read.
    case readCompressed = "read_compressed"
    /// Guest data is written to the image.
    case writeAio = "write_aio"
    /// A compressed cluster is written.
    case writeCompressed = "write_compressed"
    /// VM state is read.
    case vmstateLoad = "vmstate_load"
    /// VM state is written.
    case vmstateSave = "vmstate_save"
    /// Copy-on-write: the untouched part of a cluster is read.
    case cowRead = "cow_read"
    /// Copy-on-write: the untouched part of a cluster is written.
    case cowWrite = "cow_write"
    /// The refcount table is read.
    case reftableLoad = "reftable_load"
    /// The refcount table is grown.
    case reftableGrow = "reftable_grow"
    /// A refcount table entry is written.
    case reftableUpdate = "reftable_update"
    /// A refcount block is read.
    case refblockLoad = "refblock_load"
    /// A refcount block is written.
    case refblockUpdate = "refblock_update"
    /// Part of a refcount block is written.
    case refblockUpdatePart = "refblock_update_part"
    /// A refcount block is allocated.
    case refblockAlloc = "refblock_alloc"
    /// A new refcount block is hooked into the refcount table.
    case refblockAllocHookup = "refblock_alloc_hookup"
    /// A new refcount block is written.
    case refblockAllocWrite = "refblock_alloc_write"
    /// Refcount blocks for a grown refcount table are written.
    case refblockAllocWriteBlocks = "refblock_alloc_write_blocks"
    /// A grown refcount table is written.
    case refblockAllocWriteTable = "refblock_alloc_write_table"
    /// The header is switched to a grown refcount table.
    case refblockAllocSwitchTable = "refblock_alloc_switch_table"
    /// Host clusters are allocated.
    case clusterAlloc = "cluster_alloc"
    /// Host bytes (for compressed data) are allocated.
    case clusterAllocBytes = "cluster_alloc_bytes"
    /// Host clusters are freed.
    case clusterFree = "cluster_free"
    /// Metadata caches are written out to the host (before a flush).
    case flushToOS = "flush_to_os"
    /// The host file is flushed to stable storage.
    case flushToDisk = "flush_to_disk"
    /// A write reads the head of its first unaligned block.
    case pwritevRmwHead = "pwritev_rmw_head"
    /// A write has read the head of its first unaligned block.
    case pwritevRmwAfterHead = "pwritev_rmw_after_head"
    /// A write reads the tail of its last unaligned block.
    case pwritevRmwTail = "pwritev_rmw_tail"
    /// A write has read the tail of its last unaligned block.
    case pwritevRmwAfterTail = "pwritev_rmw_after_tail"
    /// A write is issued to a node.
    case pwritev = "pwritev"
    /// A write of zeros is issued to a node.
    case pwritevZero = "pwritev_zero"
    /// A write to a node has completed.
    case pwritevDone = "pwritev_done"
    /// An image is about to be emptied.
    case emptyImagePrepare = "empty_image_prepare"
    /// Shrinking: the smaller L1 table is written.
    case l1ShrinkWriteTable = "l1_shrink_write_table"
    /// Shrinking: the L2 tables past the new end are freed.
    case l1ShrinkFreeL2Clusters = "l1_shrink_free_l2_clusters"
    /// Copy-on-read writes the data it read.
    case corWrite = "cor_write"
    /// Space for new clusters is allocated in the host file.
    case clusterAllocSpace = "cluster_alloc_space"
    /// No event (blkdebug reports it once when it opens).
    case none = "none"
}

/// A node that reacts to the ``BlkdebugEvent``s the drivers above it report (QEMU's
/// `bdrv_debug_event` callback, which only blkdebug implements). Drivers never call this
/// directly: they call ``BlockDriver/debugEvent(_:)`` on their child, which finds the receiver.
public protocol DebugEventReceiver: BlockDriver {
    /// Reacts to `event`: arms error injection rules, changes the state, or suspends the
    /// caller until it is resumed.
    func receiveDebugEvent(_ event: BlkdebugEvent) async
}

extension BlockDriver {
    /// Reports `event` to the first ``DebugEventReceiver`` at or below this node, following
    /// filters and `file` children (QEMU's `BLKDBG_EVENT` on a child). With no receiver —
    /// every node but a blkdebug one — nothing happens, which is QEMU's behaviour too.
    public func debugEvent(_ event: BlkdebugEvent) async {
        var node: (any BlockDriver)? = self
        var hops = 0
        while let n = node?.innermostDriver, hops < 16 {
            if let receiver = n as? any DebugEventReceiver {
                await receiver.receiveDebugEvent(event)
                return
            }
            node = n.filterChild ?? n.file
            hops += 1
        }
    }
}

/// A node that can stop requests at a ``BlkdebugEvent`` until they are resumed (QEMU's
/// `bdrv_debug_breakpoint` family, behind qemu-io's `break`, `resume`, `remove_break` and
/// `wait_break`). A breakpoint fires once: the request that reports the event waits, tagged,
/// and the breakpoint is gone.
public protocol DebugBreakpoints: DebugEventReceiver {
    /// Stops the next request that reports `event`, tagging it `tag`.
    func setBreakpoint(event: BlkdebugEvent, tag: String)
    /// Removes the breakpoints tagged `tag` and resumes every request stopped with that tag.
    /// - Returns: false when there was neither (QEMU's ENOENT).
    func removeBreakpoint(tag: String) -> Bool
    /// Resumes one request stopped with `tag`.
    /// - Returns: false when none is stopped with it (QEMU's ENOENT).
    func resume(tag: String) -> Bool
    /// Whether a request stopped with `tag` is waiting.
    func isSuspended(tag: String) -> Bool
}

extension BlockDriver {
    /// The first node at or below this one that has ``DebugBreakpoints``, found as
    /// ``debugEvent(_:)`` finds its receiver; nil when there is none (QEMU's ENOTSUP).
    public var debugBreakpointNode: (any DebugBreakpoints)? {
        var node: (any BlockDriver)? = self
        var hops = 0
        while let n = node?.innermostDriver, hops < 16 {
            if let b = n as? any DebugBreakpoints { return b }
            node = n.filterChild ?? n.file
            hops += 1
        }
        return nil
    }
}
