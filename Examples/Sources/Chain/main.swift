// Builds a backing chain with the library's high-level API, reads through it, then
// flattens it into one image (what `qemu-img convert` does) and checks the copy.
//
//   swift run ChainExample [DIRECTORY]
import QBlock
#if canImport(Glibc)
import Glibc
#endif

func runExample(in dir: String) async throws {
    let base = "\(dir)/base.raw", top = "\(dir)/top.qcow2", flat = "\(dir)/flat.qcow2"
    let mib: Int64 = 1 << 20

    // A raw base image with 1 MiB of 0x11 at its start.
    try await Image.create(base, format: .raw, size: 16 * mib)
    try await Image.withOpened(base, format: .raw) { image in
        try await image.write([UInt8](repeating: 0x11, count: Int(mib)), at: 0)
    }

    // A qcow2 overlay on it: it holds only what is written to it.
    try await Image.create(top, format: .qcow2, size: 16 * mib, backing: BackingImage(base, format: .raw))
    try await Image.withOpened(top, format: .qcow2) { image in
        try await image.write([UInt8](repeating: 0x22, count: 4096), at: 4096)
        let head = try await image.read(at: 0, count: 3 * 4096)
        print("bytes at 0, 4096, 8192:", head[0], head[4096], head[8192])   // 17 34 17: base, overlay, base
        for layer in try image.info.layers {
            print("  \(layer.path): \(layer.format), \(layer.virtualSize) bytes\(layer.isReadOnly ? ", read-only" : "")")
        }
    }

    // Flatten the chain into a standalone image and compare.
    try await Image.convert(top, to: flat, format: .qcow2)
    let original = try await Image.withOpened(top, mode: .readOnly) { try await $0.read(at: 0, count: Int($0.size)) }
    let copy = try await Image.withOpened(flat, mode: .readOnly) { image in
        print("flat image backing chain:", try image.info.backingChain.isEmpty ? "none" : "some")
        return try await image.read(at: 0, count: Int(image.size))
    }
    print(original == copy ? "flat copy matches the chain" : "MISMATCH")
}

let dir = CommandLine.arguments.count > 1 ? CommandLine.arguments[1] : "/tmp"
do {
    try await runExample(in: dir)
} catch {
    StandardStream.error.write("example: \((error as? BlockError)?.message ?? "\(error)")\n")
    exit(1)
}
