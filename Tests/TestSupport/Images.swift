import Foundation
import Testing
import QBlock

/// Builds test images with QEMU's own tools.
public enum Images {
    /// A sparse raw file: holes, data, explicit zeros, an unaligned tail.
    public static func sparseRaw(_ dir: TempDir, _ name: String = "sparse.raw", size: Int64 = 4 << 20) throws -> String {
        let path = dir.file(name)
        try truncateFile(path, to: size)
        try writeFile(path, at: 65536, [UInt8](repeating: 1, count: 65536))
        try writeFile(path, at: 1 << 20, [UInt8](repeating: 0, count: 8192))
        try writeFile(path, at: 3 << 20, [UInt8](repeating: 2, count: 4096))
        return path
    }

    /// qemu-io on `path` with `commands`; fails the test if it fails.
    public static func qemuIO(_ path: String, format: String, _ commands: [String]) throws {
        let r = try run("qemu-io", ["-f", format] + commands.flatMap { ["-c", $0] } + [path])
        #expect(r.status == 0, "qemu-io failed: \(r)")
    }

    /// qcow2 with data, zero, compressed and unallocated clusters over a raw backing file
    /// shorter than itself, and a second overlay on top.
    public static func qcow2Chain(_ dir: TempDir, clusterSize: Int = 65536) throws -> (base: String, mid: String, top: String) {
        let base = dir.file("base.raw"), mid = dir.file("mid.qcow2"), top = dir.file("top.qcow2")
        try mustRun("qemu-img", "create", "-q", "-f", "raw", base, "2M")
        try qemuIO(base, format: "raw", ["write -P 3 0 1M"])
        #expect(try run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=\(clusterSize)",
                        "-b", "base.raw", "-F", "raw", mid, "4M", cwd: dir.path).status == 0)
        // A compressed write must be one whole cluster.
        let compressedAt = clusterSize <= 512 * 1024 ? 512 * 1024 : 2 << 20
        try qemuIO(mid, format: "qcow2", ["write -P 5 64k 64k", "write -z 256k 128k", "write -c -P 7 \(compressedAt) \(clusterSize)",
                                          "write -P 9 3M 64k", "write -z -u 1M 64k"])
        try mustRun("qemu-img", "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", top, cwd: dir.path)
        try qemuIO(top, format: "qcow2", ["write -P 1 0 4k", "write -z 3M 4k"])
        return (base, mid, top)
    }
}
