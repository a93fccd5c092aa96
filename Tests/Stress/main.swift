// The writer process of the crash-consistency test: runs StressPlan rounds against an image
// (16 requests in flight per round), flushes after each round, and prints "FLUSHED n" once
// round n is durable. The test kills it with SIGKILL at a random moment.
#if canImport(Glibc)
import Glibc
#endif
import QBlock
import TestSupport

let args = CommandLine.arguments
guard args.count == 4, let seed = UInt64(args[2]), let rounds = Int(args[3]) else {
    StandardStream.error.write("usage: qblock-stress IMAGE SEED ROUNDS\n")
    exit(2)
}
do {
    let node = try await ImageOpener.open(args[1])
    let size = Int(node.length)
    for round in 0..<rounds {
        let ops = StressPlan.ops(seed: seed, round: round, size: size)
        try await withThrowingTaskGroup(of: Void.self) { g in
            for op in ops {
                g.addTask {
                    switch op.kind {
                    case .write:
                        try await node.write(at: Int64(op.offset), bytes: [UInt8](repeating: op.byte, count: op.length))
                    case .zero:
                        try await node.writeZeroes(at: Int64(op.offset), length: Int64(op.length), flags: [])
                    case .zeroUnmap:
                        try await node.writeZeroes(at: Int64(op.offset), length: Int64(op.length), flags: [.mayUnmap])
                    }
                }
            }
            try await g.waitForAll()
        }
        try await node.flush()
        print("FLUSHED \(round)")
        StandardStream.output.flush()
    }
    try await node.close()
} catch {
    StandardStream.error.write("qblock-stress: \(error)\n")
    exit(1)
}
