import QBlockCore

/// The values capability protocols (`Capabilities.swift`) take and return.

// MARK: Internal snapshots

/// One internal snapshot as QEMU describes it (QAPI's `SnapshotInfo`), whatever the format
/// stores besides (see ``InternalSnapshotting``).
public struct SnapshotInfo: Sendable, Equatable {
    /// The unique id: "1", "2", ... as QEMU numbers them.
    public var id: String
    /// The name (tag); not necessarily unique.
    public var name: String
    /// When the snapshot was taken: seconds since the epoch.
    public var dateSeconds: UInt32
    /// When the snapshot was taken: the nanoseconds part.
    public var dateNanoseconds: UInt32
    /// The guest's virtual clock when the snapshot was taken, in nanoseconds.
    public var vmClockNanoseconds: UInt64
    /// The size of the saved VM state (0 for a disk-only snapshot).
    public var vmStateSize: UInt64
    /// The instruction count of record/replay, or nil when there is none (QEMU's -1).
    public var icount: UInt64?

    /// Creates a snapshot description; the fields are those of `qemu-img snapshot -l`.
    public init(id: String, name: String, dateSeconds: UInt32, dateNanoseconds: UInt32, vmClockNanoseconds: UInt64,
                vmStateSize: UInt64, icount: UInt64?) {
        self.id = id
        self.name = name
        self.dateSeconds = dateSeconds
        self.dateNanoseconds = dateNanoseconds
        self.vmClockNanoseconds = vmClockNanoseconds
        self.vmStateSize = vmStateSize
        self.icount = icount
    }

    /// The QAPI `SnapshotInfo` object `qemu-img info --output=json` lists.
    public var qobject: QObject {
        var d = QObject.Dict()
        d["id"] = .string(id)
        d["name"] = .string(name)
        d["vm-state-size"] = .int(Int64(bitPattern: vmStateSize))
        d["date-sec"] = .int(Int64(dateSeconds))
        d["date-nsec"] = .int(Int64(dateNanoseconds))
        d["vm-clock-sec"] = .int(Int64(vmClockNanoseconds / 1_000_000_000))
        d["vm-clock-nsec"] = .int(Int64(vmClockNanoseconds % 1_000_000_000))
        if let icount { d["icount"] = .int(Int64(bitPattern: icount)) }
        return .dict(d)
    }
}

// MARK: Check

/// How `check` repairs what it finds (`-r leaks` / `-r all`).
public enum CheckRepair: String, Sendable {
    case leaks, all
}

/// The result of a consistency check, with the fields of `qemu-img check --output=json`.
public struct CheckResult: Sendable, Equatable {
    /// Problems that make the image unsafe to use (`corruptions`).
    public var corruptions = 0
    /// Clusters allocated but referenced by nothing: wasted space, harmless (`leaks`).
    public var leaks = 0
    /// Errors that stopped the check from looking at part of the image (`check-errors`).
    public var checkErrors = 0
    /// Corruptions repaired by `-r all`.
    public var corruptionsFixed = 0
    /// Leaks repaired by `-r leaks` or `-r all`.
    public var leaksFixed = 0
    /// The end of the last used host cluster, in bytes (`image-end-offset`).
    public var imageEndOffset: Int64 = 0
    /// Clusters the guest-visible size spans (`total-clusters`).
    public var totalClusters: Int64 = 0
    /// Of those, the ones allocated in this image (`allocated-clusters`).
    public var allocatedClusters: Int64 = 0
    /// Allocated clusters not contiguous with the previous one on the host (`fragmented-clusters`).
    public var fragmentedClusters: Int64 = 0
    /// Allocated clusters stored compressed (`compressed-clusters`).
    public var compressedClusters: Int64 = 0
    /// One line per problem found, worded as qemu-img prints them
    /// ("Leaked cluster 5 refcount=1 reference=0").
    public var messages: [String] = []
    /// The image's dirty bit is set: it was not closed cleanly, and metadata that was not
    /// flushed before then is lost. A read-write open, or a repairing check, rebuilds what is
    /// needed and clears the bit.
    public var notClosedCleanly = false
    /// An empty result: no problems, all counts 0.
    public init() {}
}

// MARK: Information

/// QEMU's `BlockDriverInfo`: what `qemu-img info` and qemu-io's `info` show for any format.
public struct DriverInfo: Sendable, Equatable {
    /// Bytes per allocation unit (0: none).
    public var clusterSize: Int
    /// Where a VM state saved with an internal snapshot would start (qemu-io's "vm state offset").
    public var vmStateOffset: Int64
    /// The image was not closed cleanly (qcow2's dirty bit): "cleanly shut down: no".
    public var isDirty: Bool

    /// Creates the description from its three fields.
    public init(clusterSize: Int, vmStateOffset: Int64, isDirty: Bool) {
        self.clusterSize = clusterSize
        self.vmStateOffset = vmStateOffset
        self.isDirty = isDirty
    }
}

// MARK: Compression

/// Compresses one cluster at a time for a ``CompressedWriting`` image (its algorithm and
/// cluster size). One compressor is used by one task at a time.
public protocol ClusterCompressor: AnyObject {
    /// Where ``compress(_:)`` puts its output.
    var output: AlignedBuffer { get }
    /// Compresses a whole cluster into ``output``; returns the compressed length, or nil
    /// when compression would not make it smaller (then the cluster is written as is).
    func compress(_ input: UnsafeRawBufferPointer) -> Int?
}
