import Foundation
import Testing
import QBlock

/// Fixtures for the persistent bitmap suites: QEMU's view of a bitmap (qemu-nbd -B +
/// nbdinfo --map), ours, and images made by qemu-img.
public enum BitmapFixtures {
    public static let ready = NBDHarness.ready && Tools.executable("img") != nil && Tools.executable("io") != nil

    /// `nbdinfo --map=qemu:dirty-bitmap:NAME` of `image` served by `tool` (-r, -B NAME).
    public static func map(_ tool: String, _ image: String, _ name: String, dir: TempDir, extra: [String] = ["-r"]) throws -> String {
        try NBDHarness.with(tool, extra + ["-f", "qcow2", "-B", name], image: image, dir: dir, tag: "\(tool)-map") { s in
            try mustRun("nbdinfo", "--map=qemu:dirty-bitmap:\(name)", s.uri).stdout
        }
    }

    /// The map nbdinfo would print for `b` over a disk of `size` bytes.
    public static func map(of b: DirtyBitmap, size: Int64) -> String {
        var extents: [(Int64, Int64, Int)] = []
        func add(_ o: Int64, _ l: Int64, _ f: Int) {
            guard l > 0 else { return }
            if let last = extents.last, last.2 == f { extents[extents.count - 1].1 += l } else { extents.append((o, l, f)) }
        }
        var pos: Int64 = 0
        while let (o, l) = b.nextDirtyArea(from: pos) {
            add(pos, o - pos, 0)
            add(o, l, 1)
            pos = o + l
        }
        add(pos, size - pos, 0)
        func pad(_ s: String, _ n: Int) -> String { String(repeating: " ", count: max(0, n - s.count)) + s }
        return extents.map { "\(pad(String($0.0), 10)) \(pad(String($0.1), 11))    \($0.2)  \($0.2 == 1 ? "dirty" : "clean")\n" }.joined()
    }

    /// A 16 MiB qcow2 image with bitmaps b0 (enabled, `granularity`), b1 (enabled, 512)
    /// and off (disabled, 64 KiB), after QEMU writes marked them.
    public static func qemuImage(_ dir: TempDir, granularity: Int = 65536, name: String = "a.qcow2") throws -> String {
        let path = dir.file(name)
        try mustRun("qemu-img", "create", "-q", "-f", "qcow2", path, "16M")
        try mustRun("qemu-img", "bitmap", "--add", "-g", String(granularity), path, "b0")
        try mustRun("qemu-img", "bitmap", "--add", "-g", "512", path, "b1")
        try mustRun("qemu-img", "bitmap", "--add", "--disable", path, "off")
        try mustRun("qemu-io", "-f", "qcow2", "-c", "write 1M 100k", "-c", "write 5M 512", "-c", "write -z 9M 3M",
                    "-c", "discard 14M 128k", path)
        return path
    }

    /// qemu-img info without the lines that depend on the file name and host allocation.
    public static func info(_ path: String) throws -> String {
        try mustRun("qemu-img", "info", path).stdout.split(separator: "\n")
            .filter { !$0.hasPrefix("image:") && !$0.hasPrefix("disk size:") }.joined(separator: "\n")
    }

    /// `mustRun` with an argument array.
    @discardableResult
    public static func must(_ tool: String, _ args: [String]) throws -> RunResult {
        let r = try run(tool, args)
        if r.status != 0 { throw NBDStartFailed(description: "\(([tool] + args).joined(separator: " ")) failed: \(r)") }
        return r
    }

    public static func checkClean(_ path: String) throws -> Bool {
        try run("qemu-img", "check", path).stdout.hasPrefix("No errors were found on the image.")
    }

    /// Opens `image` read-write in qemu-nbd, writes through it, waits until the bitmaps
    /// show in use (qemu-nbd may listen before it has marked them), and kills it.
    public static func killWriter(_ image: String, dir: TempDir) throws {
        let s = try NBDHarness.start("qemu-nbd", ["-t", "-f", "qcow2"], image: image, dir: dir, tag: "rw")
        defer {
            kill(s.pid, SIGKILL)
            _ = NBDHarness.reap(s.pid)
        }
        try mustRun("qemu-io", "-f", "raw", "-c", "write 0 64k", s.uri)
        let deadline = Date().addingTimeInterval(5)
        while Date() < deadline, try !run("qemu-img", "info", "-U", image).stdout.contains("in-use") { usleep(20_000) }
    }
}
