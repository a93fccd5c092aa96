/// A line the block layer reports while it works, outside the result of any request: QEMU's
/// drivers print these on stderr as they happen ("qcow2: Marking image as corrupt: …",
/// the repair lines of an image opened dirty, "qcow2_free_clusters failed: …").
///
/// The library never prints them itself: a driver posts them with ``BlockNotices/post(_:)``
/// and the program decides where they go (``BlockNotices/install(_:)``).
public struct BlockNotice: Sendable, Equatable {
    /// What the notice is about.
    public enum Kind: Sendable, Equatable {
        /// A format driver found its metadata inconsistent (QEMU's `qcow2_signal_corruption`).
        case corruption
        /// A line of a consistency check or repair the driver ran on its own (an image opened
        /// after an unclean shutdown).
        case repair
        /// An operation failed in a way its caller does not report (the failure leaks space
        /// at most), or any other warning.
        case warning
    }

    /// What the notice is about.
    public var kind: Kind
    /// The line, as QEMU prints it, without the newline.
    public var text: String

    /// A notice of `kind` with the line `text` (no newline).
    public init(_ kind: Kind, _ text: String) {
        self.kind = kind
        self.text = text
    }
}

/// Where the drivers' ``BlockNotice``s go: a process-wide sink the program installs at start
/// (the tools print each line on stderr, as QEMU's tools do). Without a sink, notices are
/// dropped: a library that is not asked does not write on the process's streams.
///
/// The sink is called on the thread of the driver that posts, synchronously, so a line comes
/// out before the request that caused it completes; it must be quick and must not call back
/// into the block layer.
public enum BlockNotices {
    /// A notice sink: called with each notice.
    public typealias Sink = @Sendable (BlockNotice) -> Void

    // @unchecked: `sink` is only read or written with `lock` held.
    private final class State: @unchecked Sendable {
        let lock = PosixMutex()
        var sink: Sink?
    }

    private static let state = State()

    /// Installs `sink` (nil: drop notices) and returns the sink it replaces.
    @discardableResult
    public static func install(_ sink: Sink?) -> Sink? {
        state.lock.withLock {
            let old = state.sink
            state.sink = sink
            return old
        }
    }

    /// Sends `notice` to the installed sink, if any.
    public static func post(_ notice: BlockNotice) {
        let sink = state.lock.withLock { state.sink }
        sink?(notice)
    }

    /// Sends a notice of `kind` with the line `text` to the installed sink, if any.
    public static func post(_ kind: BlockNotice.Kind, _ text: String) {
        post(BlockNotice(kind, text))
    }

    /// The sink the tools install: each notice's line on standard error, unprefixed, as
    /// QEMU's block drivers print them with `fprintf(stderr, …)`.
    public static let standardError: Sink = { StandardStream.error.write($0.text + "\n") }
}
