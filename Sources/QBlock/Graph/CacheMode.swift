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

/// How a host file's requests reach the kernel, as QEMU's `aio=` / qemu-io's `--aio` name it.
/// The data a request reads or writes is the same whichever is chosen.
public enum AIOMode: String, Sendable, CaseIterable {
    /// Blocking pread/pwrite on a pool of threads (QEMU's default).
    case threads
    /// The kernel's asynchronous I/O; QEMU's Linux AIO needs `O_DIRECT` (`cache.direct=on`).
    /// Here it is served by io_uring, the kernel's successor interface, under the same rule.
    case native
    /// io_uring.
    case ioUring = "io_uring"

    /// Parses `threads`, `native` or `io_uring`.
    public init?(qemuName: String) { self.init(rawValue: qemuName) }

    /// QEMU's error when `native` is asked for without `O_DIRECT`, nil when `cache` allows it.
    public func conflict(with cache: CacheMode) -> String? {
        self == .native && !cache.direct
            ? "aio=native was specified, but it requires cache.direct=on, which was not specified." : nil
    }
}
