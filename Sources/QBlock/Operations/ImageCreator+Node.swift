#if canImport(Glibc)
import Glibc
#endif
import QBlockCore
import QBlockGraph

/// Creation entry points for QMP's `blockdev-create`, whose options are structured rather
/// than qemu-img's `-o` strings: a protocol-level `file`, and a qcow2 image written onto an
/// already open node (``Qcow2Node/create(on:size:options:)``).
extension ImageCreator {
    /// Creates (or empties) the file at `path` as QEMU's file driver does for
    /// `blockdev-create`: truncated to 0, marked no-copy-on-write when asked, then grown to
    /// `size` (not rounded, unlike qemu-img create) with `preallocation`.
    /// - Throws: ``BlockError`` "Could not create 'PATH': …", "Could not resize file: …".
    public static func createFile(path: String, size: Int64, preallocation: Preallocation = .off,
                                  nocow: Bool = false) async throws {
        if size < 0 {
            // QEMU creates the file, then fails to resize it to the (unsigned) huge size.
            try await createRaw(Plan(format: "raw", path: path, size: 0, values: [:], formattingLine: ""), nocow: nocow)
            throw BlockError(.invalidArgument, "Could not resize file: Invalid argument", errno: EINVAL, path: path, operation: "create")
        }
        let plan = Plan(format: "raw", path: path, size: size, values: ["preallocation": preallocation.rawValue], formattingLine: "")
        try await createRaw(plan, nocow: nocow, roundUp: false)
    }
}

/// File attributes set through `ioctl`.
enum FileAttributes {
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
