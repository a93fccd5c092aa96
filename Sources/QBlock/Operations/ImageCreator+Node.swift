#if canImport(Glibc)
import Glibc
#endif
import QBlockCore
import QBlockGraph
import QBlockDrivers

/// Creation entry points for QMP's `blockdev-create`, whose options are structured rather
/// than qemu-img's `-o` strings: a protocol-level `file` here; formats write their image
/// onto an already open node through their driver (``BlockdevCreatable``).
extension ImageCreator {
    /// Creates (or empties) the file at `path` as QEMU's file driver does for
    /// `blockdev-create`: truncated to 0, marked no-copy-on-write when asked, then grown to
    /// `size` (not rounded, unlike qemu-img create) with `preallocation`.
    /// - Throws: ``BlockError`` "Could not create 'PATH': …", "Could not resize file: …".
    public static func createFile(path: String, size: Int64, preallocation: Preallocation = .off,
                                  nocow: Bool = false) async throws {
        // (A negative size: QEMU creates the file, then fails to resize it to the unsigned huge size.)
        try await FileCreation.createExactly(path: path, size: size, preallocation: preallocation, nocow: nocow)
    }
}
