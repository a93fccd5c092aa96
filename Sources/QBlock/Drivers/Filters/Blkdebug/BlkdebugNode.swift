#if canImport(Glibc)
import Glibc
#endif
import QBlockCore
import QBlockGraph

/// The `blkdebug` filter (QEMU's `block/blkdebug.c`): a node above an image's file that
/// fails requests on cue, to test how the drivers above it handle I/O errors.
///
/// It holds ``BlkdebugRule``s. Format drivers report ``BlkdebugEvent``s to their `file`
/// child (``BlockDriver/debugEvent(_:)``); when this node receives an event, the rules for
/// that event whose `state` matches the node's state (0 matches any) act:
/// - `inject-error` rules become the *active* rules (replacing those armed by an earlier
///   event). Every later request of a matching type that covers the rule's offset (any
///   offset when the rule has none) fails with the rule's errno; a `once` rule is removed
///   after it fails one request, the others stay armed.
/// - `set-state` rules move the node to their new state once all rules of the event ran.
///
/// The node reports to itself the events QEMU's generic block layer reports for every
/// node: `pwritev` (or `pwritev_zero`) before each write it passes down and `pwritev_done`
/// after, `flush_to_os` and `flush_to_disk` before a flush.
///
/// The node starts in state 1, as QEMU's. Requests larger than ``maxTransfer`` are split,
/// each fragment checked on its own; write-zeroes requests shorter than ``optWriteZero``
/// (or the alignment) become writes of a zeroed buffer, as QEMU's block layer does when
/// blkdebug refuses them. After ``close()`` every call throws `.closed`.
// @unchecked Sendable: the mutable rule state is only touched with `lock` held; the rest is immutable.
public final class BlkdebugNode: BlockStatusChecking, DebugBreakpoints, @unchecked Sendable {
    /// `blkdebug`, as QEMU names the driver.
    public let driverName = "blkdebug"
    /// The image file the filter sits on (QEMU's `image` child).
    public let image: any BlockDriver
    /// The config file the rules came from, if any (for the node's file name).
    public let configFile: String?
    /// The request alignment this node imposes (at least the image's).
    public let requestAlignment: Int
    /// The largest request passed down at once (0: no limit).
    public let maxTransfer: Int
    /// The smallest write-zeroes request passed down as one (0: the alignment).
    public let optWriteZero: Int
    /// The largest write-zeroes request passed down at once (0: no limit; `max-transfer`
    /// limits only the writes of zeros for unaligned parts, as in QEMU's block layer).
    public let maxWriteZero: Int
    private let lock = PosixMutex()
    private let gate = CloseGate()
    // Guarded by `lock`: the rules by id, the ids of the armed ones (newest first), the state.
    nonisolated(unsafe) private var rules: [Int: BlkdebugRule] = [:]
    nonisolated(unsafe) private var order: [Int] = []
    nonisolated(unsafe) private var active: [Int] = []
    nonisolated(unsafe) private var state = 1
    /// Write-type requests so far, and how many of them the last successful flush covered (under `lock`).
    nonisolated(unsafe) private var writeGeneration = 0
    nonisolated(unsafe) private var flushedGeneration = 0
    // Guarded by `lock`: breakpoints (event, tag) and the requests they stopped, oldest first.
    nonisolated(unsafe) private var breakpoints: [(event: BlkdebugEvent, tag: String)] = []
    nonisolated(unsafe) private var suspended: [(tag: String, resume: CheckedContinuation<Void, Never>)] = []

    /// Creates the filter above `image` with `rules`.
    /// - Parameters:
    ///   - image: the node below; the filter owns it and closes it.
    ///   - rules: the rules in the order given (config file first, then options).
    ///   - configFile: the config file's path, for ``filename``.
    ///   - align: a request alignment to impose (0: the image's).
    ///   - maxTransfer: the largest request passed down at once (0: no limit).
    ///   - optWriteZero: the smallest write-zeroes request passed down (0: the alignment).
    /// - Throws: ``BlockError`` `.invalidArgument` with QEMU's "Cannot meet constraints
    ///   with …" when a limit is not a power of two or not a multiple of the alignment.
    public init(image: any BlockDriver, rules: [BlkdebugRule], configFile: String? = nil,
                align: Int = 0, maxTransfer: Int = 0, optWriteZero: Int = 0, maxWriteZero: Int = 0) throws {
        if align != 0 && (align >= Int(Int32.max) || align & (align - 1) != 0) {
            throw BlockError(.invalidArgument, "Cannot meet constraints with align \(align)", operation: "open")
        }
        let alignment = max(align, image.requestAlignment, 1)
        if maxTransfer != 0 && (maxTransfer >= Int(Int32.max) || maxTransfer % alignment != 0) {
            throw BlockError(.invalidArgument, "Cannot meet constraints with max-transfer \(maxTransfer)", operation: "open")
        }
        if optWriteZero != 0 && (optWriteZero >= Int(Int32.max) || optWriteZero % alignment != 0) {
            throw BlockError(.invalidArgument, "Cannot meet constraints with opt-write-zero \(optWriteZero)", operation: "open")
        }
        if maxWriteZero != 0 && (maxWriteZero >= Int(Int32.max) || maxWriteZero % max(optWriteZero, align, 1) != 0) {
            throw BlockError(.invalidArgument, "Cannot meet constraints with max-write-zero \(maxWriteZero)", operation: "open")
        }
        self.image = image
        self.configFile = configFile
        self.requestAlignment = alignment
        self.maxTransfer = maxTransfer
        self.optWriteZero = optWriteZero
        self.maxWriteZero = maxWriteZero
        // QEMU inserts each rule at the head of its event's list: later rules act first.
        for (i, r) in rules.enumerated() { self.rules[i] = r }
        order = Array(rules.indices.reversed())
    }

    /// `blkdebug:CONFIG:IMAGE` (the config part empty without a config file), as QEMU names it.
    public var filename: String { "blkdebug:\(configFile ?? ""):\(image.filename)" }
    /// The image's length.
    public var length: Int64 { image.length }
    /// Whether the image is read-only.
    public var isReadOnly: Bool { image.isReadOnly }
    /// The image, as QEMU's primary child.
    public var file: (any BlockDriver)? { image }
    /// The image.
    public var filteredChild: any BlockDriver { image }
    /// None: a filter has no backing child.
    public var backing: (any BlockDriver)? { nil }

    /// The node's current state (1 after opening).
    public var currentState: Int { lock.withLock { state } }

    /// Processes `event`: arms its `inject-error` rules and applies its `set-state` rules,
    /// both only for rules of the current state (or of state 0).
    /// A breakpoint on the event stops the caller until ``resume(tag:)`` (printing QEMU's
    /// "blkdebug: Suspended request 'TAG'" on stdout).
    public func receiveDebugEvent(_ event: BlkdebugEvent) async {
        let stops: [String] = lock.withLock {
            var newState = state
            var armed = false
            for id in order {
                guard let r = rules[id], r.event == event, r.state == 0 || r.state == state else { continue }
                switch r.action {
                case .injectError:
                    if !armed { active = []; armed = true }
                    active.insert(id, at: 0)
                case .setState(let s):
                    newState = s
                }
            }
            state = newState
            let hits = breakpoints.filter { $0.event == event }.map(\.tag)
            breakpoints.removeAll { $0.event == event }
            return hits
        }
        for tag in stops {
            await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
                lock.withLock { suspended.append((tag, c)) }
                StandardStream.output.write("blkdebug: Suspended request '\(tag)'\n")
            }
        }
    }

    /// Stops the next request that reports `event` (a one-shot breakpoint tagged `tag`).
    public func setBreakpoint(event: BlkdebugEvent, tag: String) {
        lock.withLock { breakpoints.insert((event, tag), at: 0) }
    }

    /// Removes the breakpoints tagged `tag` and resumes the requests stopped with it.
    /// - Returns: false when there was neither.
    public func removeBreakpoint(tag: String) -> Bool {
        let removed: Bool = lock.withLock {
            let before = breakpoints.count
            breakpoints.removeAll { $0.tag == tag }
            return breakpoints.count != before
        }
        var resumed = false
        while resume(tag: tag) { resumed = true }
        return removed || resumed
    }

    /// Resumes the most recently stopped request tagged `tag` (printing QEMU's "blkdebug:
    /// Resuming request 'TAG'" on stdout).
    /// - Returns: false when none is stopped with that tag.
    public func resume(tag: String) -> Bool {
        let c: CheckedContinuation<Void, Never>? = lock.withLock {
            guard let i = suspended.lastIndex(where: { $0.tag == tag }) else { return nil }
            return suspended.remove(at: i).resume
        }
        guard let c else { return false }
        StandardStream.output.write("blkdebug: Resuming request '\(tag)'\n")
        c.resume()
        return true
    }

    /// Whether a request stopped with `tag` is waiting.
    public func isSuspended(tag: String) -> Bool {
        lock.withLock { suspended.contains { $0.tag == tag } }
    }

    /// Fails with the errno of the first armed rule that matches the request, as QEMU's
    /// `rule_check`; removes a `once` rule that fired.
    private func check(_ type: BlkdebugIOType, offset: Int64, length: Int64, operation: String) throws {
        let err: Int32? = lock.withLock {
            for id in active {
                guard let r = rules[id], case .injectError(let errno, let types, let at, let once, _) = r.action else { continue }
                if let at, !(length > 0 && at >= offset && at < offset + length) { continue }
                guard types.contains(type) else { continue }
                if errno == 0 { return nil }
                if once {
                    rules[id] = nil
                    order.removeAll { $0 == id }
                    active.removeAll { $0 == id }
                }
                return errno
            }
            return nil
        }
        if let err { throw BlockError.system(err, operation, path: image.filename, offset: offset) }
    }

    /// The fragments of a request of `count` bytes at most ``maxTransfer`` long.
    private func fragments(_ count: Int) -> [Range<Int>] {
        guard maxTransfer > 0, count > maxTransfer else { return [0..<count] }
        return stride(from: 0, to: count, by: maxTransfer).map { $0..<min($0 + maxTransfer, count) }
    }

    /// Reads through to the image unless an armed rule fails the read (each fragment
    /// of at most ``maxTransfer`` bytes is checked on its own).
    /// - Throws: ``BlockError`` with the rule's errno, `.closed`, or the image's error.
    public func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws {
        try await gate.run(filename, "read") {
            for f in fragments(buffer.count) {
                try check(.read, offset: offset + Int64(f.lowerBound), length: Int64(f.count), operation: "read")
                try await image.read(at: offset + Int64(f.lowerBound), into: UnsafeMutableRawBufferPointer(rebasing: buffer[f]))
            }
        }
    }

    /// Writes through to the image unless an armed rule fails the write.
    /// - Throws: ``BlockError`` with the rule's errno, `.closed`, or the image's error.
    public func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags) async throws {
        try await gate.run(filename, "write") {
            defer { wrote() }
            for f in fragments(buffer.count) {
                await receiveDebugEvent(.pwritev)
                try check(.write, offset: offset + Int64(f.lowerBound), length: Int64(f.count), operation: "write")
                try await image.write(at: offset + Int64(f.lowerBound), from: UnsafeRawBufferPointer(rebasing: buffer[f]), flags: flags)
                await receiveDebugEvent(.pwritevDone)
            }
        }
    }

    /// Zeroes through to the image: the part aligned to ``optWriteZero`` (or the alignment)
    /// as write-zeroes requests, the unaligned head and tail as writes of zeros.
    /// - Throws: ``BlockError`` with the rule's errno, `.closed`, or the image's error.
    public func writeZeroes(at offset: Int64, length: Int64, flags: WriteFlags) async throws {
        try await gate.run(filename, "write zeroes") {
            defer { wrote() }
            let unit = Int64(max(optWriteZero, requestAlignment))
            let start = min((offset + unit - 1) / unit * unit, offset + length)
            let end = max((offset + length) / unit * unit, start)
            if start > offset { try await zeroWrite(at: offset, length: start - offset, flags: flags) }
            if end > start {
                let step = maxWriteZero > 0 ? max(Int64(maxWriteZero) / unit * unit, unit) : end - start
                var at = start
                while at < end {
                    let n = min(step, end - at)
                    await receiveDebugEvent(.pwritevZero)
                    try check(.writeZeroes, offset: at, length: n, operation: "write zeroes")
                    try await image.writeZeroes(at: at, length: n, flags: flags)
                    await receiveDebugEvent(.pwritevDone)
                    at += n
                }
            }
            if offset + length > end { try await zeroWrite(at: end, length: offset + length - end, flags: flags) }
        }
    }

    private func zeroWrite(at offset: Int64, length: Int64, flags: WriteFlags) async throws {
        let zeros = AlignedBuffer(count: Int(length))
        var writeFlags = flags
        writeFlags.remove([.mayUnmap, .noFallback])
        try await zeros.withUnsafeBytes { b in
            for f in fragments(b.count) {
                try check(.write, offset: offset + Int64(f.lowerBound), length: Int64(f.count), operation: "write")
                try await image.write(at: offset + Int64(f.lowerBound), from: UnsafeRawBufferPointer(rebasing: b[f]), flags: writeFlags)
            }
        }
    }

    /// Discards through to the image unless an armed rule fails the discard.
    /// - Throws: ``BlockError`` with the rule's errno, `.closed`, or the image's error.
    public func discard(at offset: Int64, length: Int64) async throws {
        try await gate.run(filename, "discard") {
            defer { wrote() }
            try check(.discard, offset: offset, length: length, operation: "discard")
            try await image.discard(at: offset, length: length)
        }
    }

    /// Flushes the image unless an armed rule fails flushes. As QEMU's block layer, a flush
    /// with no write since the last successful one only passes on to the image: no
    /// `flush_to_disk` event, no rule checked.
    /// - Throws: ``BlockError`` with the rule's errno, `.closed`, or the image's error.
    public func flush() async throws {
        try await gate.run(filename, "flush") {
            let generation = lock.withLock { writeGeneration }
            await receiveDebugEvent(.flushToOS)
            if generation != lock.withLock({ flushedGeneration }) {
                await receiveDebugEvent(.flushToDisk)
                try check(.flush, offset: 0, length: 0, operation: "flush")
            }
            try await image.flush()
            lock.withLock { flushedGeneration = max(flushedGeneration, generation) }
        }
    }

    /// Counts a write-type request (QEMU's `write_gen`), which a later flush must reach the disk for.
    private func wrote() { lock.withLock { writeGeneration += 1 } }

    /// The image's status, unless an armed `block-status` rule fails the query.
    /// - Throws: ``BlockError`` with the rule's errno, `.closed`, or the image's error.
    public func blockStatus(at offset: Int64, length: Int64) async throws -> BlockStatus {
        try await gate.run(filename, "block status") {
            try check(.blockStatus, offset: offset, length: length, operation: "block status")
            return try await image.blockStatus(at: offset, length: length)
        }
    }

    /// Fails as ``blockStatus(at:length:)`` would when an armed `block-status` rule matches.
    /// - Throws: ``BlockError`` with the rule's errno.
    public func checkBlockStatus(at offset: Int64, length: Int64) throws {
        try check(.blockStatus, offset: offset, length: length, operation: "block status")
    }

    /// Resizes the image.
    /// - Throws: `.closed`, or the image's error.
    public func truncate(to length: Int64, preallocation: Preallocation) async throws {
        try await gate.run(filename, "truncate") {
            defer { wrote() }
            try await image.truncate(to: length, preallocation: preallocation)
        }
    }

    /// Closes the filter and the image, after the requests in flight.
    /// - Throws: the image's close error.
    public func close() async throws {
        guard await gate.beginClose() else { return }
        await gate.drain()
        gate.finishClose()
        try await image.close()
    }
}
