/// How to open an image (the options qemu-img and qemu-io take on their command lines).
public struct OpenOptions: Sendable {
    /// The format driver to use; `nil` probes (qcow2 by its magic, else raw).
    public var format: String?
    /// Open read-only.
    public var readOnly: Bool
    /// Host cache mode for every file in the chain.
    public var cache: CacheMode
    /// Share every permission with other processes (`-U`); only with `readOnly`.
    public var forceShare: Bool
    /// Open backing files (false: `img info` on an image whose backing file is missing
    /// still works, as qemu-img does with BDRV_O_NO_BACKING).
    public var openBacking: Bool
    /// Take QEMU-compatible image locks.
    public var locking: Bool
    /// qcow2 L2 cache size in bytes (`nil`: QEMU's default, enough for 8 GiB of disk or 1 MiB).
    public var l2CacheSize: Int?
    /// Allow opening an image marked corrupt, read-only, to inspect or repair it.
    public var allowCorrupt: Bool
    /// Whether this open is for a check with repair (opens images marked corrupt read-write).
    public var forRepair: Bool
    /// Snapshot mode (qemu-io's and QEMU's `-s`, `snapshot=on`): the image is opened
    /// read-only under a temporary qcow2 overlay that takes every write and is deleted when
    /// it is closed; the image itself never changes.
    public var snapshot = false
    /// Copy-on-read (`-C`, `copy-on-read=on`): data read from the backing chain is written
    /// into the top image.
    public var copyOnRead = false
    /// How host files submit their requests; nil: io_uring when the kernel has it, else threads.
    public var aio: AIOMode?
    /// Options only the chosen format understands (``FormatOpenOptions``), as its
    /// ``FormatDriver/readBlockdevOptions(_:into:)`` set them; nil: the format's defaults.
    public var formatOptions: (any FormatOpenOptions)?
    /// The node's discard mode (QEMU's `BDRV_O_UNMAP`): true (`discard=unmap`, the tools'
    /// default, as qemu-img's and qemu-io's) lets a format pass the guest's discards on to
    /// its file by default (qcow2's `pass-discard-request`); `blockdev-add`'s default
    /// `discard=ignore` does not.
    public var discardUnmap = true
    /// Set by the opener when it chose the format by probing the file (no `format`): the
    /// probe, which returns the format a first sector would be taken for. A raw node opened
    /// so behaves as QEMU's probed raw node: 512-byte request alignment, and no write that
    /// would make its first sector probe as another format. Callers leave it nil.
    public var formatProbe: (@Sendable ([UInt8]) -> String?)?

    /// Creates open options; every parameter is the property of the same name, and the
    /// defaults open read-write, with the page cache, backing files and locks, probing the format.
    public init(format: String? = nil, readOnly: Bool = false, cache: CacheMode = .writeback,
                forceShare: Bool = false, openBacking: Bool = true, locking: Bool = true,
                l2CacheSize: Int? = nil, allowCorrupt: Bool = false, forRepair: Bool = false) {
        self.format = format
        self.readOnly = readOnly
        self.cache = cache
        self.forceShare = forceShare
        self.openBacking = openBacking
        self.locking = locking
        self.l2CacheSize = l2CacheSize
        self.allowCorrupt = allowCorrupt
        self.forRepair = forRepair
    }
}
