// A disk in use: a writer keeps writing while the library takes a live snapshot and then
// mirrors the disk to a new image and switches the writer over to it.
//
//   swift run LiveSnapshotMirrorExample [DIRECTORY]
import QBlock
#if canImport(Glibc)
import Glibc
#endif

func runExample(in dir: String) async throws {
    let disk = "\(dir)/disk.qcow2", snapshot = "\(dir)/disk-snap.qcow2", copy = "\(dir)/disk-copy.qcow2"
    for path in [disk, snapshot, copy] { unlink(path) }
    try await Image.create(disk, format: .qcow2, size: 64 << 20)

    try await LiveDisk.withOpened(disk, format: .qcow2) { live in
        // The "guest": writes 64 KiB blocks round the disk until cancelled.
        let writer = Task {
            var offset: Int64 = 0
            var writes = 0
            while !Task.isCancelled {
                try await live.active.write([UInt8](repeating: UInt8(truncatingIfNeeded: writes | 1), count: 65536), at: offset)
                offset = (offset + 65536 * 7) % live.active.size
                writes += 1
                try? await Task.sleep(nanoseconds: 2_000_000)
            }
            return writes
        }

        // A live snapshot: disk.qcow2 freezes (read-only), new writes go to the overlay.
        try await live.snapshot(to: snapshot)
        print("after the snapshot:", try live.info.layers.map { "\($0.path)\($0.isReadOnly ? " (ro)" : "")" })

        // Mirror the whole disk to a new image, then switch to it.
        let mirror = try await live.mirror(to: copy, sync: .full, mode: .background)
        let log = Task { for await event in mirror.events { print("  mirror:", event) } }
        try await mirror.ready()
        print("mirror ready, \(mirror.progress.completed) bytes copied")
        try mirror.complete()
        try await mirror.finished()
        await log.value

        writer.cancel()
        print("writer made \(try await writer.value) writes")
        print("after the mirror:", try live.info.layers.map(\.path))
    }
    // The copy is a standalone image holding everything the writer wrote.
    try await Image.withOpened(copy, mode: .readOnly) { image in
        print("copy: \(try image.info.format), backing images: \(try image.info.backingChain.count)")
    }
}

let dir = CommandLine.arguments.count > 1 ? CommandLine.arguments[1] : "/tmp"
do {
    try await runExample(in: dir)
} catch {
    StandardStream.error.write("example: \((error as? BlockError)?.message ?? "\(error)")\n")
    exit(1)
}
