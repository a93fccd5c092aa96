#if canImport(Glibc)
import Glibc
#endif
import QBlockCore
import QBlockGraph

/// The `blkverify` filter (QEMU's `block/blkverify.c`): every request goes to two images,
/// the image under test and a raw copy known to be right, and reads compare them.
///
/// Reads read both; when the bytes differ, QEMU prints "blkverify: read offset=O bytes=N
/// contents mismatch at offset X" on stderr and exits. A library must not end its process,
/// so this node prints the same line and fails the read with ``BlockError`` `.corrupt`
/// carrying it; a request that succeeds on one image and fails on the other fails the same
/// way ("return value mismatch"). Writes and write-zeroes go to both; a flush only to the
/// test image, and discards are dropped, both as QEMU (the raw copy's content is all that
/// matters). Block status is the raw copy's, QEMU's primary child.
// @unchecked Sendable: no mutable state besides the close gate, which is thread-safe.
public final class BlkverifyNode: BlockFilter, @unchecked Sendable {
    /// `blkverify`, as QEMU names the driver.
    public let driverName = "blkverify"
    /// The image under test (QEMU's `test` child).
    public let test: any BlockDriver
    /// The raw copy reads are checked against (QEMU's `raw` child).
    public let raw: any BlockDriver
    private let gate = CloseGate()

    /// Creates the filter; it owns both children and closes them.
    public init(test: any BlockDriver, raw: any BlockDriver) {
        self.test = test
        self.raw = raw
    }

    /// `blkverify:RAW:TEST`, as QEMU names the node.
    public var filename: String { "blkverify:\(raw.filename):\(test.filename)" }
    /// The test image's length.
    public var length: Int64 { test.length }
    /// Whether either image refuses writes.
    public var isReadOnly: Bool { test.isReadOnly || raw.isReadOnly }
    /// The larger alignment of the two images.
    public var requestAlignment: Int { max(test.requestAlignment, raw.requestAlignment) }
    /// The raw copy, QEMU's `file` child.
    public var file: (any BlockDriver)? { raw }
    /// The test image, whose content the filter shows.
    public var filteredChild: any BlockDriver { test }
    /// None: a filter has no backing child.
    public var backing: (any BlockDriver)? { nil }

    /// Prints QEMU's line on stderr and returns the error that fails the request.
    private func mismatch(_ op: String, _ offset: Int64, _ count: Int, _ what: String) -> BlockError {
        let line = "blkverify: \(op) offset=\(offset) bytes=\(count) \(what)"
        StandardStream.error.write(line + "\n")
        return BlockError(.corrupt, line, errno: EIO, path: filename, offset: offset, operation: op)
    }

    /// Runs `body` on both images; fails loudly when one fails and the other does not.
    private func both(_ op: String, _ offset: Int64, _ count: Int,
                      _ body: @Sendable (any BlockDriver) async throws -> Void) async throws {
        var testError: (any Error)?
        var rawError: (any Error)?
        do { try await body(test) } catch { testError = error }
        do { try await body(raw) } catch { rawError = error }
        switch (testError, rawError) {
        case (nil, nil): return
        case (let e?, _?): throw e
        case (let e?, nil):
            throw mismatch(op, offset, count, "return value mismatch \(-(Self.errno(of: e))) != 0")
        case (nil, let e?):
            throw mismatch(op, offset, count, "return value mismatch 0 != \(-(Self.errno(of: e)))")
        }
    }

    private static func errno(of error: any Error) -> Int32 {
        (error as? BlockError)?.errno ?? EIO
    }

    /// Reads from both images and compares them.
    /// - Throws: ``BlockError`` `.corrupt` "blkverify: read offset=… bytes=… contents
    ///   mismatch at offset …" (also printed on stderr), `.closed`, or the images' error.
    public func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws {
        try await gate.run(filename, "read") {
            let copy = AlignedBuffer(count: buffer.count)
            var testError: (any Error)?
            var rawError: (any Error)?
            do { try await test.read(at: offset, into: buffer) } catch { testError = error }
            do { try await copy.withUnsafeMutableBytes { try await raw.read(at: offset, into: $0) } } catch { rawError = error }
            switch (testError, rawError) {
            case (nil, nil): break
            case (let e?, _?): throw e
            case (let e?, nil): throw mismatch("read", offset, buffer.count, "return value mismatch \(-Self.errno(of: e)) != 0")
            case (nil, let e?): throw mismatch("read", offset, buffer.count, "return value mismatch 0 != \(-Self.errno(of: e))")
            }
            let firstDifference: Int? = copy.withUnsafeBytes { r in
                (0..<buffer.count).first { buffer[$0] != r[$0] }
            }
            if let d = firstDifference {
                throw mismatch("read", offset, buffer.count, "contents mismatch at offset \(offset + Int64(d))")
            }
        }
    }

    /// Writes to both images.
    /// - Throws: ``BlockError`` (a return value mismatch, `.closed`, the images' error).
    public func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags) async throws {
        try await gate.run(filename, "write") {
            // SAFETY: the buffer outlives both writes, which finish before `both` returns.
            nonisolated(unsafe) let b = buffer
            try await both("write", offset, buffer.count) { try await $0.write(at: offset, from: b, flags: flags) }
        }
    }

    /// Zeroes the range in both images.
    /// - Throws: ``BlockError`` (a return value mismatch, `.closed`, the images' error).
    public func writeZeroes(at offset: Int64, length: Int64, flags: WriteFlags) async throws {
        try await gate.run(filename, "write zeroes") {
            try await both("write", offset, Int(length)) { try await $0.writeZeroes(at: offset, length: length, flags: flags) }
        }
    }

    /// Does nothing, as QEMU's blkverify (which has no discard): a discard is a hint, and
    /// after it either content is allowed.
    /// - Throws: `.closed` after ``close()``.
    public func discard(at offset: Int64, length: Int64) async throws {
        try gate.check(filename, "discard")
    }

    /// Flushes the test image only, as QEMU.
    /// - Throws: `.closed`, or the test image's error.
    public func flush() async throws {
        try await gate.run(filename, "flush") { try await test.flush() }
    }

    /// The raw copy's status (QEMU's primary child).
    /// - Throws: `.closed`, or the raw copy's error.
    public func blockStatus(at offset: Int64, length: Int64) async throws -> BlockStatus {
        try await gate.run(filename, "block status") { try await raw.blockStatus(at: offset, length: length) }
    }

    /// Refuses: QEMU's blkverify cannot be resized.
    /// - Throws: ``BlockError`` `.unsupported`.
    public func truncate(to length: Int64, preallocation: Preallocation) async throws {
        throw BlockError(.unsupported, "Image format driver does not support resize", path: filename, operation: "truncate")
    }

    /// Closes the filter and both images, after the requests in flight.
    /// - Throws: the first close error.
    public func close() async throws {
        guard await gate.beginClose() else { return }
        await gate.drain()
        gate.finishClose()
        var first: (any Error)?
        do { try await test.close() } catch { first = error }
        do { try await raw.close() } catch { if first == nil { first = error } }
        if let first { throw first }
    }
}

/// The `blkverify` driver as the registry sees it: `blkverify:RAW:TEST`, the raw copy
/// opened as a protocol node and the test image as a whole image (its format probed), as
/// QEMU opens them.
public enum BlkverifyProtocol: PrefixedFilterDriver {
    /// `blkverify`, as QEMU names the driver.
    public static let name = "blkverify"
    /// `blkverify:`.
    public static let filenamePrefix = "blkverify:"

    /// Splits `blkverify:RAW:TEST` into the `raw` and `test` children.
    /// - Throws: ``BlockError`` "blkverify requires raw copy and original image path".
    public static func parseFilename(_ filename: String) throws -> PrefixedFilename {
        let rest = filename.dropFirst(filenamePrefix.count)
        guard let colon = rest.firstIndex(of: ":") else {
            throw BlockError(.invalidArgument, "blkverify requires raw copy and original image path", path: filename, operation: "open")
        }
        return PrefixedFilename(options: QObject.Dict(), children: [
            ("raw", String(rest[..<colon])), ("test", String(rest[rest.index(after: colon)...])),
        ], imageMembers: ["test"])
    }

    /// Opens the filter above `children` (raw, then test).
    /// - Throws: ``BlockError`` `.invalidArgument` when a child is missing.
    public static func open(_ parsed: PrefixedFilename, children: [any BlockDriver], options: OpenOptions) async throws -> any BlockDriver {
        guard children.count == 2 else { throw BlockError(.invalidArgument, "blkverify needs a raw and a test image", operation: "open") }
        return BlkverifyNode(test: children[1], raw: children[0])
    }
}
