// Serves an image over NBD with the library's server and reads it back, and writes to it,
// with the library's NBD client.
//
//   swift run NBDRoundTripExample [DIRECTORY]
import QBlock
#if canImport(Glibc)
import Glibc
#endif

func runExample(in dir: String) async throws {
    let path = "\(dir)/served.qcow2", socket = "\(dir)/served.sock"
    unlink(path)
    try await Image.create(path, format: .qcow2, size: 8 << 20)
    let pattern = (0..<65536).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ 7) }

    try await Image.withOpened(path, format: .qcow2) { image in
        try await image.write(pattern, at: 1 << 20)
        // Served for as long as the closure runs.
        try await image.withNBDExport(name: "disk", at: .unix(path: socket)) { uri in
            print("serving \(uri)")
            // The client side: the export's bytes are the guest's view, hence raw.
            try await Image.withOpened(uri, format: .raw, mode: .readWrite) { remote in
                let back = try await remote.read(at: 1 << 20, count: pattern.count)
                print(back == pattern ? "read back over NBD what was written" : "MISMATCH over NBD")
                try await remote.write([UInt8](repeating: 0xab, count: 4096), at: 0, flags: .fua)
            }
        }
        let head = try await image.read(at: 0, count: 4096)
        print(head.allSatisfy { $0 == 0xab } ? "the client's write reached the image" : "MISMATCH locally")
    }
}

let dir = CommandLine.arguments.count > 1 ? CommandLine.arguments[1] : "/tmp"
do {
    try await runExample(in: dir)
} catch {
    StandardStream.error.write("example: \((error as? BlockError)?.message ?? "\(error)")\n")
    exit(1)
}
