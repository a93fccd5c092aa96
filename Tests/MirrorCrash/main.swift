// The writer process of the mirror crash test: mirrors SOURCE to TARGET (qcow2 images of
// the same size) with a persistent bitmap in BITMAP, while writing MirrorCrashPlan's writes
// through the source's backend, flushing after every MirrorCrashPlan.writesPerFlush of
// them and printing "FLUSHED n" once writes [0, (n+1)*writesPerFlush) are durable. The
// test kills it with SIGKILL at a random moment and finishes the mirror offline.
#if canImport(Glibc)
import Glibc
#endif
import QBlock
import TestSupport

let args = CommandLine.arguments
guard args.count >= 6, let seed = UInt64(args[4]), let speed = UInt64(args[5]) else {
    StandardStream.error.write("usage: qblock-mirror-crash SOURCE TARGET BITMAP SEED SPEED [COPY-MODE]\n")
    exit(2)
}
do {
    let graph = BlockGraph()
    let source = BlockNode(nodeName: "src", driver: try await ImageOpener.open(args[1]))
    let target = BlockNode(nodeName: "tgt", driver: try await ImageOpener.open(args[2], options: OpenOptions(format: "qcow2")))
    try graph.add(source)
    try graph.add(target)
    let backend = BlockBackend(name: "disk", node: source)
    graph.attach(backend)
    let jobs = JobManager()
    jobs.subscribe { e in
        if case .ready = e.event { print("READY"); StandardStream.output.flush() }
    }
    let mirror = try MirrorJob(source: source, target: target, graph: graph,
                               options: MirrorOptions(sync: .full, copyMode: MirrorCopyMode(rawValue: args.count > 6 ? args[6] : "background") ?? .background,
                                                      targetIsZeroed: true, bitmapFile: args[3]))
    _ = try jobs.start(mirror, options: JobOptions(id: "mirror0", speed: speed))
    while backend.node === source { try await Task.sleep(nanoseconds: 1_000_000) }
    print("STARTED")
    StandardStream.output.flush()
    let size = backend.length
    for round in 0..<100_000 {
        for k in 0..<MirrorCrashPlan.writesPerFlush {
            let w = MirrorCrashPlan.write(round * MirrorCrashPlan.writesPerFlush + k, seed: seed, size: size)
            try await backend.write(at: w.offset, bytes: [UInt8](repeating: w.byte, count: w.length))
        }
        try await backend.flush()
        print("FLUSHED \(round)")
        StandardStream.output.flush()
        try await Task.sleep(nanoseconds: 2_000_000)
    }
} catch {
    StandardStream.error.write("qblock-mirror-crash: \(error)\n")
    exit(1)
}
