#if canImport(Glibc)
import Glibc
#endif
import QBlockCore
import QBlockGraph

/// Creating host files as QEMU's file driver does (`raw_co_create`): for `qemu-img create -f
/// raw` and QMP's `blockdev-create` of a `file`.
package enum FileCreation {
    /// Creates (or empties) the file at `path`: truncated to zero, marked no-copy-on-write
    /// when asked, then grown to `size` with `preallocation`; the first block of a file
    /// that was empty is written so that it is allocated.
    /// - Parameter roundUp: round the size up to whole 512-byte sectors (qemu-img does).
    /// - Throws: ``BlockError`` "Could not create 'PATH': …", "Could not resize file: …",
    ///   "Unsupported preallocation mode: metadata".
    /// - Parameter extentSizeHint: the file's extent size hint (``setExtentSizeHint(_:_:)``),
    ///   QEMU's 1 MiB when nil.
    package static func create(path: String, size requested: Int64, preallocation prealloc: Preallocation,
                       nocow: Bool = false, roundUp: Bool = true, extentSizeHint: Int64? = nil) async throws {
        let size = roundUp ? (requested + 511) / 512 * 512 : requested
        let file: FileNode
        do {
            file = try FileNode(path: path, readOnly: false, perm: [.write, .resize],
                                shared: [.consistentRead, .write, .writeUnchanged], create: true)
        } catch {
            let e = error.asBlockError
            if e.code == .locked {
                throw BlockError(e.code, e.message, errno: e.errno, path: path, operation: "create")
            }
            throw BlockError(e.code, "Could not create '\(path)': \(e.message)", errno: e.errno, path: path, operation: "create")
        }
        do {
            try await file.truncate(to: 0, preallocation: .off)
            // As QEMU: a hint for copy-on-write file systems, its failure ignored.
            if nocow { setNoCOW(path) }
            setExtentSizeHint(path, extentSizeHint ?? defaultExtentSizeHint)
            if prealloc == .metadata {
                // QEMU's file driver fails here too, leaving the emptied file behind.
                try? await file.close()
                throw BlockError(.unsupported, "Unsupported preallocation mode: metadata", path: path, operation: "create")
            }
            try await file.truncate(to: size, preallocation: prealloc)
            if prealloc == .off && size > 0 {
                let n = size < 4096 ? 512 : 4096
                let zeros = AlignedBuffer(count: n)
                // SAFETY: `zeros` is kept alive by the async closure until the write returns.
                try await zeros.withUnsafeBytes { b in try await file.write(at: 0, from: b, flags: []) }
            }
            try await file.close()
        } catch {
            try? await file.close()
            let e = error.asBlockError
            if e.operation == "create" { throw e }
            throw BlockError(e.code, "Could not resize file: \(e.message)", errno: e.errno, path: path, operation: "create")
        }
    }

    /// Creates the file at `path` with exactly `size` bytes, as QMP's `blockdev-create` of a
    /// `file` does (and ``create(path:size:preallocation:nocow:roundUp:)`` without rounding).
    /// A negative size (a QAPI `size` beyond 2^63) creates the file and then fails to
    /// resize it, as QEMU does with the unsigned size.
    /// - Throws: ``BlockError`` as ``create(path:size:preallocation:nocow:roundUp:)``, or
    ///   "Could not resize file: Invalid argument" for a negative size.
    package static func createExactly(path: String, size: Int64, preallocation: Preallocation, nocow: Bool) async throws {
        if size < 0 {
            try await create(path: path, size: 0, preallocation: .off, nocow: nocow)
            throw BlockError(.invalidArgument, "Could not resize file: Invalid argument", errno: EINVAL, path: path, operation: "create")
        }
        try await create(path: path, size: size, preallocation: preallocation, nocow: nocow, roundUp: false)
    }

    /// QEMU's default extent size hint for new files (1 MiB).
    package static let defaultExtentSizeHint: Int64 = 1 << 20

    /// Checks an `extent_size_hint` value as QEMU does (at most 2^32 - 1).
    /// - Throws: ``BlockError`` "Extent size hint is too large".
    package static func checkExtentSizeHint(_ hint: Int64, path: String) throws {
        if hint < 0 || hint > Int64(UInt32.max) {
            throw BlockError(.invalidArgument, "Extent size hint is too large", path: path, operation: "create")
        }
    }

    /// Sets the extent size hint of the (empty) file at `path`, as QEMU's file driver does
    /// for every file it creates (XFS honours it: the file then grows in extents of that
    /// size; other file systems refuse the call, which QEMU only warns about when the hint
    /// was given explicitly and is not 0).
    /// - Returns: nil when set, else the errno of the failed ioctl.
    @discardableResult
    package static func setExtentSizeHint(_ path: String, _ hint: Int64) -> Int32? {
        let fd = open(path, O_RDONLY)
        guard fd >= 0 else { return errno }
        defer { close(fd) }
        // struct fsxattr: xflags, extsize, nextents, projid, cowextsize (UInt32 each), 8 bytes pad.
        var attr = [UInt32](repeating: 0, count: 7)
        let getAttr: UInt = 0x801C_581F, setAttr: UInt = 0x401C_5820, extSizeFlag: UInt32 = 0x800
        // SAFETY: `attr` holds 28 bytes, the size of struct fsxattr the ioctls read and write.
        let got = attr.withUnsafeMutableBytes { ioctl(fd, getAttr, $0.baseAddress!) }
        guard got == 0 else { return errno }
        attr[0] |= extSizeFlag
        attr[1] = UInt32(truncatingIfNeeded: hint)
        // SAFETY: as above.
        let set = attr.withUnsafeMutableBytes { ioctl(fd, setAttr, $0.baseAddress!) }
        return set == 0 ? nil : errno
    }

    /// Sets Linux's `FS_NOCOW_FL` on the (empty) file at `path`; failures are ignored, as
    /// QEMU ignores them (ext4 and most file systems do not know the flag).
    static func setNoCOW(_ path: String) {
        let fd = open(path, O_RDONLY)
        guard fd >= 0 else { return }
        defer { close(fd) }
        let getFlags: UInt = 0x8008_6601, setFlags: UInt = 0x4008_6602, noCOW: Int32 = 0x0080_0000
        var flags: Int32 = 0
        guard ioctl(fd, getFlags, &flags) == 0 else { return }
        flags |= noCOW
        _ = ioctl(fd, setFlags, &flags)
    }
}
