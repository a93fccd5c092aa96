import QBlockCore
import QBlockNBDWire

/// How the NBD client connects, beyond where to: the options of QEMU's `BlockdevOptionsNbd`
/// that change the connection (``NBDProtocol/readBlockdevOptions(_:)`` reads them).
public struct NBDClientOptions: Sendable, Equatable {
    /// QEMU's `x-dirty-bitmap`: the metadata context negotiated in place of
    /// `base:allocation` (`qemu:dirty-bitmap:NAME`, `qemu:allocation-depth`, …), whose
    /// flags block status reports as if they were `base:allocation`'s: bit 0 ("hole") makes
    /// a run not data, bit 1 ("zero") makes it read as zeros. A dirty run is thus "data":
    /// false, "present": false in `img map`; an allocation depth above 2 counts as 2. The
    /// open fails when the server does not agree to the context. nil: `base:allocation`.
    public var statusContext: String?
    /// QEMU's `open-timeout`, in seconds: 0 tries the connection once; otherwise failed
    /// attempts are repeated until this many seconds have passed since the open began.
    public var openTimeout: UInt32

    /// Options for a plain connection: `base:allocation`, one attempt.
    public init(statusContext: String? = nil, openTimeout: UInt32 = 0) {
        self.statusContext = statusContext
        self.openTimeout = openTimeout
    }
}

/// The first of a connection attempt and the open timer, handed to the waiting open.
// @unchecked Sendable: `result` and `waiter` are guarded by `lock`.
final class NBDOpenRace: @unchecked Sendable {
    enum Outcome: Sendable {
        case attempt(Result<(NBDSocket, NBDExportInfo), BlockError>)
        case timedOut
    }

    private let lock = PosixMutex()
    private var result: Outcome?
    private var waiter: CheckedContinuation<Outcome, Never>?

    /// Records `outcome` if nothing finished first; false if something did.
    func finish(_ outcome: Outcome) -> Bool {
        let (first, waiting): (Bool, CheckedContinuation<Outcome, Never>?) = lock.withLock {
            if result != nil { return (false, nil) }
            result = outcome
            defer { waiter = nil }
            return (true, waiter)
        }
        waiting?.resume(returning: outcome)
        return first
    }

    /// Waits for the first outcome.
    func outcome() async -> Outcome {
        await withCheckedContinuation { (c: CheckedContinuation<Outcome, Never>) in
            let done: Outcome? = lock.withLock {
                if let result { return result }
                waiter = c
                return nil
            }
            if let done { c.resume(returning: done) }
        }
    }
}
