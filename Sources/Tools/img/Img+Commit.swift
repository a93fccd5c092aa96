import ArgumentParser
import QBlock
import ToolSupport

struct ImgCommit: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "commit", abstract: "Write an image's changes into its backing file.")

    @Option(name: .customShort("f"), help: "Image format.") var format: String?
    @Option(name: .customShort("b"), help: "The image of the backing chain to commit into (implies -d).") var base: String?
    @Option(name: .customShort("t"), help: "Cache mode.") var cache: String?
    @Option(name: .customShort("r"), help: "Rate limit (ignored: nothing else runs).") var rateLimit: String?
    @Flag(name: .customShort("d"), help: "Do not empty the image after the commit.") var keep = false
    @Flag(name: .customShort("p"), help: "Show progress.") var progress = false
    @Flag(name: .customShort("q"), help: "Quiet.") var quiet = false
    @Argument(help: "Image file name.") var files: [String] = []

    func run() async throws {
        guard files.count == 1 else { throw tool.usageError("Expecting one image file name") }
        var mode = CacheMode.unsafe
        if let c = cache {
            guard let m = CacheMode(qemuName: c) else { throw tool.fail("Invalid cache option: \(c)") }
            mode = m
        }
        if let format, !ImageOpener.formats.contains(format) {
            throw tool.fail("Could not open '\(files[0])': Unknown driver '\(format)'")
        }
        let showProgress = progress && !quiet
        do {
            try await ImageCommit.commit(path: files[0], format: format, base: base, keepTop: keep, cache: mode,
                                         progress: showProgress ? { printProgress($0) } : nil)
        } catch let e as BlockError {
            if showProgress { writeStdout("\n") }
            throw tool.fail(e.operation == "open" ? ToolProgram.openErrorMessage(e, e.path ?? files[0]) : e.message)
        }
        if showProgress { writeStdout("\n") }
        if !quiet { writeStdout("Image committed.\n") }
    }
}
