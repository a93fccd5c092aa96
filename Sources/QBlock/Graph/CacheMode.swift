/// Host cache modes, as QEMU's `-t`/`cache=` option names them.
public enum CacheMode: String, Sendable, CaseIterable {
    /// Page cache used; flush makes writes durable (the default).
    case writeback
    /// O_DIRECT: the page cache is bypassed; flush still needed for durability.
    case none
    /// Page cache used; every write is flushed before it completes.
    case writethrough
    /// O_DIRECT and every write flushed.
    case directsync
    /// Page cache used and flushes ignored.
    case unsafe

    /// Opens files with `O_DIRECT`, bypassing the host page cache (`none`, `directsync`).
    public var direct: Bool { self == .none || self == .directsync }
    /// Every write is made durable before it completes (`writethrough`, `directsync`).
    public var writeThrough: Bool { self == .writethrough || self == .directsync }
    /// Flush requests are not passed to the host (`unsafe`).
    public var ignoresFlush: Bool { self == .unsafe }

    /// Parses qemu-img's `-t` values.
    public init?(qemuName: String) {
        self.init(rawValue: qemuName)
    }
}
