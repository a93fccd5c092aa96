#if canImport(Glibc)
import Glibc
#endif
import QBlockCore
import QBlockGraph

/// The `raw` format driver: the guest sees its `file` child's bytes unchanged.
///
/// Like QEMU's raw driver it may expose a window (`offset`, `size`) of the child.
///
/// The node owns its child: ``close()`` waits for the requests in flight, then closes it;
/// every call after that throws ``BlockError`` with code `.closed`.
// @unchecked Sendable: every stored property is immutable or thread-safe itself (LockedFlag, CloseGate).
public final class RawNode: BlockDriver, @unchecked Sendable {
    /// `raw`, as QEMU names the driver.
    public let driverName = "raw"
    /// The node whose bytes this one exposes (usually a ``FileNode``); owned by this node.
    public let child: any BlockDriver
    /// The child, as QEMU's `file` child of the raw node.
    public var file: (any BlockDriver)? { child }
    /// Always `nil`: raw images have no backing file.
    public var backing: (any BlockDriver)? { nil }
    /// The child's file name.
    public var filename: String { child.filename }
    /// Read-only because its file is, or because a reopen made it so (``setReadOnly(_:)``).
    public var isReadOnly: Bool { formatReadOnly.value || child.isReadOnly }
    private let formatReadOnly = LockedFlag()
    private let gate = CloseGate()

    /// Makes the node refuse writes (true) or pass them to its file again (false), whatever
    /// the file's own mode (QEMU's reopen of a raw node; raw keeps no metadata to flush).
    public func setReadOnly(_ readOnly: Bool) { formatReadOnly.set(readOnly) }
    /// The child's alignment; at least 512 for a probed node (QEMU's `raw_refresh_limits`:
    /// a guest of a probed raw image works in whole sectors).
    public var requestAlignment: Int { probe == nil ? child.requestAlignment : max(512, child.requestAlignment) }
    /// Whether the format was found by probing (``OpenOptions/formatProbe``), as QEMU's
    /// `bs->probed`: writes that would make the first sector probe as another format fail.
    public var isProbed: Bool { probe != nil }
    private let probe: (@Sendable ([UInt8]) -> String?)?
    /// Where the window starts in the child.
    public var offset: Int64 { windowLock.withLock { window.offset } }
    private var fixedSize: Int64? { windowLock.withLock { window.size } }
    private let windowLock = PosixMutex()
    private var window: (offset: Int64, size: Int64?)

    /// Creates a raw view of `file`, starting at byte `offset` and `size` bytes long
    /// (`nil`: up to the end of the file, following its growth). Takes ownership of `file`.
    public convenience init(file: any BlockDriver, offset: Int64 = 0, size: Int64? = nil) {
        self.init(file: file, offset: offset, size: size, probe: nil)
    }

    /// ``init(file:offset:size:)``; with `probe` (the format was found by probing, see
    /// ``OpenOptions/formatProbe``), the node is a probed one (``isProbed``).
    public init(file: any BlockDriver, offset: Int64, size: Int64?, probe: (@Sendable ([UInt8]) -> String?)?) {
        self.child = file
        self.window = (offset, size)
        self.probe = probe
    }

    /// Moves the window (qemu-io's `reopen -o offset=…,size=…`, QEMU's raw reopen); call
    /// it with no request in flight.
    /// - Throws: ``BlockError`` `.invalidArgument` for a window the file cannot hold (QEMU's messages).
    public func setWindow(offset: Int64, size: Int64?) throws {
        try Self.checkWindow(offset: offset, size: size, fileLength: (child.length + 511) / 512 * 512)
        windowLock.withLock { window = (offset, size) }
    }

    /// QEMU's checks of a raw window (`raw_apply_options`): the offset within the file, the
    /// window inside it, its size in whole sectors. `fileLength` is the file's length in
    /// whole sectors, as QEMU's block layer sees it.
    /// - Throws: ``BlockError`` `.invalidArgument` with QEMU's message.
    public static func checkWindow(offset: Int64, size: Int64?, fileLength: Int64) throws {
        if offset > fileLength {
            throw BlockError(.invalidArgument, "Offset (\(offset)) cannot be greater than size of the containing file (\(fileLength))")
        }
        if let size, fileLength - offset < size {
            throw BlockError(.invalidArgument, "The sum of offset (\(offset)) and size (\(size)) has to be smaller or equal to the  actual size of the containing file (\(fileLength))")
        }
        if let size, size % 512 != 0 {
            throw BlockError(.invalidArgument, "Specified size is not multiple of 512")
        }
    }

    /// For a probed node, refuses a write at `offset` that would make the first sector probe
    /// as a format other than raw (QEMU's `raw_check_write`: `EPERM`).
    private func checkProbedWrite(at offset: Int64, _ buffer: UnsafeRawBufferPointer) async throws {
        guard let probe, offset < 512, !buffer.isEmpty else { return }
        var sector = try await child.read(at: self.offset, count: 512)
        if sector.count < 512 { sector += [UInt8](repeating: 0, count: 512 - sector.count) }
        let n = min(buffer.count, 512 - Int(offset))
        for i in 0..<n { sector[Int(offset) + i] = buffer[i] }
        if let format = probe(sector), format != "raw" {
            throw BlockError(.permissionDenied, BlockError.strerror(EPERM), errno: EPERM, path: filename,
                             offset: offset, operation: "write")
        }
    }

    /// The window's size in bytes: the fixed `size`, or the child's length rounded up to
    /// whole 512-byte sectors, minus `offset`. QEMU's block layer sizes nodes in sectors, so a
    /// 320-byte file is a 512-byte disk whose tail reads as zeros (iotests 101); the file
    /// node zero-fills reads past its end and grows on writes there.
    public var length: Int64 {
        if let fixedSize { return fixedSize }
        return max(0, (child.length + 511) / 512 * 512 - offset)
    }

    /// Reads `buffer.count` bytes at guest `offset` (bytes, relative to the window) from the
    /// child.
    /// - Throws: ``BlockError`` `.closed` after ``close()``, or the child's error.
    public func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws {
        try await gate.run(filename, "read") { try await child.read(at: self.offset + offset, into: buffer) }
    }

    /// Writes `buffer` at guest `offset` (bytes) through to the child.
    /// - Throws: ``BlockError`` `.closed` after ``close()``, `.readOnly` on a read-only node,
    ///   `.permissionDenied` (`EPERM`) for a write that would change a probed node's format,
    ///   or the child's error.
    public func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags) async throws {
        try await gate.run(filename, "write") {
            if formatReadOnly.value {
                throw BlockError(.readOnly, "Permission denied: node is read-only", errno: EPERM, path: filename, operation: "write")
            }
            try await checkProbedWrite(at: offset, buffer)
            try await child.write(at: self.offset + offset, from: buffer, flags: flags)
        }
    }

    /// Makes `length` bytes at `offset` read as zeroes, passed to the child (QEMU's
    /// `bdrv_co_pwrite_zeroes`).
    /// - Throws: ``BlockError`` `.closed` after ``close()``, `.readOnly` on a read-only node, or the child's error.
    public func writeZeroes(at offset: Int64, length: Int64, flags: WriteFlags) async throws {
        try await gate.run(filename, "write zeroes") {
            if formatReadOnly.value {
                throw BlockError(.readOnly, "Permission denied: node is read-only", errno: EPERM, path: filename, operation: "write")
            }
            try await child.writeZeroes(at: self.offset + offset, length: length, flags: flags)
        }
    }

    /// Discards `length` bytes at `offset` in the child (the data may then read as anything
    /// the child returns for a hole).
    /// - Throws: ``BlockError`` `.closed` after ``close()``, `.readOnly` on a read-only node, or the child's error.
    public func discard(at offset: Int64, length: Int64) async throws {
        try await gate.run(filename, "discard") {
            if formatReadOnly.value {
                throw BlockError(.readOnly, "Permission denied: node is read-only", errno: EPERM, path: filename, operation: "write")
            }
            try await child.discard(at: self.offset + offset, length: length)
        }
    }

    /// Flushes the child's writes to stable storage; does nothing on a read-only node.
    /// - Throws: ``BlockError`` `.closed` after ``close()``, or the child's error.
    public func flush() async throws {
        try await gate.run(filename, "flush") {
            if formatReadOnly.value { return }
            try await child.flush()
        }
    }

    /// The child's status for the range, allocated at this layer when the child says data
    /// or zeros: QEMU's raw driver hands the question to its file (BDRV_BLOCK_RAW), whose
    /// answer counts as allocated only then (a file always says one of them; an nbd child
    /// with an `x-dirty-bitmap` context or null-co without read-zeroes may say neither).
    /// - Throws: ``BlockError`` `.closed` after ``close()``, or the child's error.
    public func blockStatus(at offset: Int64, length: Int64) async throws -> BlockStatus {
        try await gate.run(filename, "block status") {
            var s = try await child.blockStatus(at: self.offset + offset, length: length)
            if !s.flags.isDisjoint(with: [.data, .zero]) { s.flags.insert(.allocated) }
            return s
        }
    }

    /// Resizes the image to `length` bytes by resizing the child; `preallocation` applies to
    /// the new area (QEMU's `bdrv_co_truncate`).
    /// - Throws: ``BlockError`` `.closed` after ``close()``; `.unsupported` for a fixed-size window, or the child's error.
    public func truncate(to length: Int64, preallocation: Preallocation) async throws {
        try await gate.run(filename, "truncate") { try await truncateAdmitted(to: length, preallocation: preallocation) }
    }

    private func truncateAdmitted(to length: Int64, preallocation: Preallocation) async throws {
        if formatReadOnly.value {
            throw BlockError(.readOnly, "Permission denied: node is read-only", errno: EPERM, path: filename, operation: "write")
        }
        if fixedSize != nil {
            throw BlockError(.unsupported, "Cannot resize a raw node with a fixed size", path: filename, operation: "truncate")
        }
        try await child.truncate(to: offset + length, preallocation: preallocation)
    }

    /// Waits for the requests in flight, then closes the child. A second close returns once
    /// the first has finished.
    public func close() async throws { try await close(closingFile: true) }

    /// ``close()``, leaving the file node open: it is another node of the graph, closed by
    /// whoever owns it. Raw keeps nothing of its own to write back.
    public func closeLeavingFileOpen() async throws { try await close(closingFile: false) }

    private func close(closingFile: Bool) async throws {
        guard await gate.beginClose() else { return }
        defer { gate.finishClose() }
        await gate.drain()
        if closingFile { try await child.close() }
    }
}

extension RawNode: FileSharingClose {}
