import ArgumentParser
import QBlock
import ToolSupport

struct ImgResize: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "resize", abstract: "Change an image's virtual size.")

    @OptionGroup var image: ImageOptions
    @Flag(name: .customLong("shrink"), help: "Allow shrinking.") var shrink = false
    @Option(name: .customLong("preallocation"), help: "off, metadata, falloc or full.") var preallocation: String?
    @Flag(name: .customShort("q"), help: "Quiet.") var quiet = false
    @Argument(help: "Image file name.") var filename: String
    @Argument(help: "New size, or +SIZE / -SIZE relative to the current one.") var size: String

    func run() async throws {
        var text = Substring(size)
        let sign: Int64 = text.first == "+" ? 1 : text.first == "-" ? -1 : 0
        if sign != 0 { text = text.dropFirst() }
        guard let amount = SizeParser.parse(String(text)) else {
            throw tool.fail("Parameter 'size' expects a non-negative number below 2^64\n"
                + "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.")
        }
        var prealloc = Preallocation.off
        if let p = preallocation {
            guard let m = Preallocation(rawValue: p) else { throw tool.fail("Invalid preallocation mode '\(p)'") }
            prealloc = m
        }
        let node = try await image.open(filename, readOnly: false)
        let current = qemuLength(node)
        let total = sign == 0 ? amount : current + sign * amount
        try await closing(node) {
            if total <= 0 { throw tool.fail("New image size must be positive") }
            // (As qemu-img: preallocating makes sense only for an area that is added.)
            if total <= current && prealloc != .off { throw tool.fail("Preallocation can only be used for growing images") }
            if total < current && !shrink {
                tool.printError("Use the --shrink option to perform a shrink operation.")
                throw tool.fail("warning: Shrinking an image will delete all data beyond the shrunken image's end. "
                    + "Before performing such an operation, make sure there is no important data there.")
            }
            if node.driverName == "raw" && prealloc == .metadata {
                throw tool.fail("Unsupported preallocation mode: metadata")
            }
            do {
                try await node.truncate(to: total, preallocation: prealloc)
                try await node.flush()
            } catch let e as BlockError {
                throw tool.fail(e.message)
            }
        }
        if !quiet { writeStdout("Image resized.\n") }
    }
}
