import Foundation
import Glibc
import QBlock

/// Shared pieces of the job tests: a three-image chain, a byte model of what a writer
/// wrote, and a writer that runs while a job does.
public enum JobFixture {
    /// base.raw (4M: 0x11 in [0,1M), 0x12 in [3M,4M)) ← mid.qcow2 (0x22 in [512k,1.5M))
    /// ← top.qcow2 (0x33 in [1M,1M+64k), zeros at 2M+64k): returns the three paths.
    public static func chain(_ d: TempDir, size: String = "4M") throws -> (base: String, mid: String, top: String) {
        let base = d.file("base.raw"), mid = d.file("mid.qcow2"), top = d.file("top.qcow2")
        try mustRun("qemu-img", "create", "-q", "-f", "raw", base, size)
        try mustRun("qemu-io", "-f", "raw", "-c", "write -P 0x11 0 1M", "-c", "write -P 0x12 3M 1M", base)
        try mustRun("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", mid)
        try mustRun("qemu-io", "-c", "write -P 0x22 512k 1M", mid)
        try mustRun("qemu-img", "create", "-q", "-f", "qcow2", "-b", mid, "-F", "qcow2", top)
        try mustRun("qemu-io", "-c", "write -P 0x33 1M 64k", "-c", "write -z 2112k 64k", top)
        return (base, mid, top)
    }

    /// The image's guest content, read by qemu-img.
    public static func content(_ path: String) throws -> Data {
        let out = path + ".content.raw"
        try mustRun("qemu-img", "convert", "-U", "-O", "raw", path, out)
        defer { unlink(out) }
        return try Data(contentsOf: URL(fileURLWithPath: out))
    }

    /// Whether the image's content is `expected`; prints the differing 64k regions if not
    /// (a Bool, so that a failing #expect does not diff megabytes).
    public static func same(_ path: String, _ expected: Data) throws -> Bool {
        let got = try content(path)
        if got == expected { return true }
        print("\(path): 64k regions differing: \(differingRegions(got, expected))")
        return false
    }

    public static func check(_ path: String) throws -> Bool {
        let r = try run("qemu-img", "check", path)
        if r.status != 0 { print(r) }
        return r.status == 0
    }

    public static func backing(_ path: String) throws -> String? {
        let info = try mustRun("qemu-img", "info", "-U", "--output=json", path).stdout
        let obj = try JSONSerialization.jsonObject(with: Data(info.utf8)) as? [String: Any]
        return obj?["backing-filename"] as? String
    }
}

/// A byte model of a disk that a writer updates as its writes complete.
public final class ByteModel: @unchecked Sendable {
    // @unchecked: `bytes` is only read or written with `lock` held.
    private let lock = PosixMutex()
    private var bytes: [UInt8]
    public init(_ initial: Data) { bytes = [UInt8](initial) }
    public func write(_ offset: Int64, _ data: [UInt8]) {
        lock.withLock { bytes.replaceSubrange(Int(offset)..<Int(offset) + data.count, with: data) }
    }
    public var data: Data { lock.withLock { Data(bytes) } }
}

/// Writes random 4k..64k blocks through `node` until `stop` is set, recording each in `model`.
/// Writes never overlap in flight (one writer task); returns the number of writes.
public func runWriter(_ node: any BlockDriver, model: ByteModel, seed: UInt64, stop: @escaping @Sendable () -> Bool,
               maxWrites: Int = .max, pause: UInt64 = 2_000_000) async throws -> Int {
    var rng = SplitMix(seed: seed)
    var count = 0
    let size = node.length
    while !stop() && count < maxWrites {
        let len = Int64(4096 * (1 + Int(rng.next() % 16)))
        let off = Int64(rng.next() % UInt64((size - len) / 4096)) * 4096
        let byte = UInt8(truncatingIfNeeded: rng.next() | 1)
        let data = [UInt8](repeating: byte, count: Int(len))
        try await node.write(at: off, bytes: data)
        model.write(off, data)
        count += 1
        if pause > 0 { try? await Task.sleep(nanoseconds: pause) }
    }
    return count
}

public final class Flag: @unchecked Sendable {
    // @unchecked: `value` is only read or written with `lock` held.
    private let lock = PosixMutex()
    private var value = false
    public init() {}
    public func set() { lock.withLock { value = true } }
    public var isSet: Bool { lock.withLock { value } }
}

/// The 64k-aligned regions where two contents differ (for failure messages).
public func differingRegions(_ a: Data, _ b: Data) -> [Int] {
    guard a.count == b.count else { return [-1] }
    var out: [Int] = []
    let x = [UInt8](a), y = [UInt8](b)
    var i = 0
    while i < x.count {
        let end = min(x.count, i + 65536)
        if x[i..<end] != y[i..<end] { out.append(i / 65536) }
        i = end
    }
    return out
}
