// The writer process of the crash-consistency tests: runs StressPlan rounds against an image
// (16 requests in flight per round), flushes after each round, and prints "FLUSHED n" once
// round n is durable and "ACK n i" when request i of round n has completed. The tests kill it
// with SIGKILL at a random moment. With a write-through cache mode (writethrough, directsync)
// every acknowledged request must survive the kill, not only the flushed rounds.
#if canImport(Glibc)
import Glibc
#endif
import QBlock
import TestSupport

let args = CommandLine.arguments
guard (4...6).contains(args.count), let seed = UInt64(args[2]), let rounds = Int(args[3]) else {
    StandardStream.error.write("usage: qblock-stress IMAGE SEED ROUNDS [CACHE [AIO]]\n")
    exit(2)
}
var options = OpenOptions()
if args.count > 4 {
    guard let cache = CacheMode(qemuName: args[4]) else {
        StandardStream.error.write("qblock-stress: invalid cache mode '\(args[4])'\n")
        exit(2)
    }
    options.cache = cache
}
if args.count > 5 {
    guard let aio = AIOMode(qemuName: args[5]) else {
        StandardStream.error.write("qblock-stress: invalid aio mode '\(args[5])'\n")
        exit(2)
    }
    options.aio = aio
}
do {
    let node = try await ImageOpener.open(args[1], options: options)
    let size = Int(node.length)
    for round in 0..<rounds {
        let ops = StressPlan.ops(seed: seed, round: round, size: size)
        try await withThrowingTaskGroup(of: Void.self) { g in
            for (index, op) in ops.enumerated() {
                g.addTask {
                    switch op.kind {
                    case .write:
                        try await node.write(at: Int64(op.offset), bytes: [UInt8](repeating: op.byte, count: op.length))
                    case .zero:
                        try await node.writeZeroes(at: Int64(op.offset), length: Int64(op.length), flags: [])
                    case .zeroUnmap:
                        try await node.writeZeroes(at: Int64(op.offset), length: Int64(op.length), flags: [.mayUnmap])
                    }
                    StandardStream.output.write("ACK \(round) \(index)\n")
                    StandardStream.output.flush()
                }
            }
            try await g.waitForAll()
        }
        try await node.flush()
        StandardStream.output.write("FLUSHED \(round)\n")
        StandardStream.output.flush()
    }
    try await node.close()
} catch {
    StandardStream.error.write("qblock-stress: \(error)\n")
    exit(1)
}
