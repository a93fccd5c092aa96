import ArgumentParser
import QBlock
import ToolSupport

struct ImgBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "bench", abstract: "Run a simple I/O benchmark on an image.")

    @OptionGroup var image: ImageOptions
    @Option(name: .customShort("c"), help: "Number of requests.") var count: String?
    @Option(name: .customShort("d"), help: "Requests in flight.") var depth: String?
    @Option(name: .customShort("s"), help: "Request size.") var bufferSize: String?
    @Option(name: .customShort("S"), help: "Step between request offsets.") var step: String?
    @Option(name: .customShort("o"), help: "Offset of the first request.") var offset: String?
    @Option(name: .customShort("t"), help: "Cache mode: none, writeback, writethrough, directsync, unsafe.") var cache: String?
    @Option(name: .customShort("i"), help: "AIO engine (accepted for compatibility; one engine is used).") var aio: String?
    @Flag(name: .customShort("w"), help: "Write instead of read.") var write = false
    @Flag(name: .customShort("n"), help: "Native AIO (accepted for compatibility).") var native = false
    @Flag(name: .customShort("q"), help: "Quiet (accepted; qemu-img prints the summary anyway).") var quiet = false
    @Option(name: .customLong("pattern"), help: "Byte written by write requests.") var pattern: String?
    @Option(name: .customLong("flush-interval"), help: "Flush every N requests.") var flushInterval: String?
    @Flag(name: .customLong("no-drain"), help: "Do not wait for requests in flight before flushing.") var noDrain = false
    @Argument(help: "Image file name.") var filename: String

    func run() async throws {
        var b = Bench()
        b.write = write
        b.drain = !noDrain
        if let count { guard let v = Int(count), v >= 0 else { throw tool.fail("Invalid request count specified") }; b.count = v }
        if let depth { guard let v = Int(depth), v >= 1 else { throw tool.fail("Invalid queue depth specified") }; b.depth = v }
        if let bufferSize {
            guard let v = SizeParser.parse(bufferSize), v <= Int32.max else { throw tool.invalidNumber("buffer size") }
            b.bufferSize = Int(v)
        }
        if let step {
            guard let v = SizeParser.parse(step), v <= Int32.max else { throw tool.invalidNumber("step_size") }
            b.step = Int(v)
        }
        if let offset { b.offset = try tool.parseSize(offset, what: "offset") }
        if let pattern { guard let v = UInt8(pattern) else { throw tool.fail("Invalid pattern byte specified") }; b.pattern = v }
        if let flushInterval {
            guard let v = Int(flushInterval), v >= 0 else { throw tool.fail("Invalid flush interval specified") }
            b.flushInterval = v
        }
        var mode = CacheMode.writeback
        if let cache { guard let m = CacheMode(qemuName: cache) else { throw tool.fail("Invalid cache mode") }; mode = m }
        if let aio, !["threads", "native", "io_uring"].contains(aio) { throw tool.fail("Invalid aio option: \(aio)") }
        do { try b.validate() } catch let e as BlockError { throw tool.fail(e.message) }
        let node = try await image.open(filename, readOnly: !write, cache: mode)
        writeStdout(b.headerText)
        try await closing(node) {
            do {
                let seconds = try await b.run(on: node)
                writeStdout(Bench.completionText(seconds: seconds))
            } catch let e as BlockError {
                throw tool.fail("Failed request: \(e.message)")
            }
        }
    }
}
