// Creates a raw image, writes a pattern through the library, reads it back and shows
// the file's allocation map (the runs qemu-img map would list).
import QBlock
#if canImport(Glibc)
import Glibc
#endif

func runExample(path: String) async throws {
    try await ImageCreator.create(format: "raw", path: path, size: 4 << 20)
    let disk = try await ImageOpener.open(path, options: OpenOptions(format: "raw"))
    // Buffers handed to async I/O must stay valid while it runs: AlignedBuffer owns its memory.
    let data = AlignedBuffer(count: 65536)
    data.withUnsafeMutableBytes { _ = $0.initializeMemory(as: UInt8.self, repeating: 0x5a) }
    try await data.withUnsafeBytes { try await disk.write(at: 1 << 20, from: $0, flags: []) }
    try await disk.flush()
    let back = AlignedBuffer(count: 65536)
    try await back.withUnsafeMutableBytes { try await disk.read(at: 1 << 20, into: $0) }
    print(back.bytes == data.bytes ? "read back what was written" : "MISMATCH")
    for e in try await BlockMap.entries(of: disk) { print(e) }
    try await disk.close()
}

// The argument is a scratch directory (the examples all take one).
let dir = CommandLine.arguments.count > 1 ? CommandLine.arguments[1] : "/tmp"
let path = dir + "/qblock-example.raw"
do {
    try await runExample(path: path)
} catch {
    let message = (error as? BlockError)?.message ?? "\(error)"
    StandardStream.error.write("example: \(message)\n")
    exit(1)
}
