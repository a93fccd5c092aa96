import ArgumentParser
import QBlock
import ToolSupport

struct ImgMap: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "map", abstract: "Show where an image's data lies.")

    @OptionGroup var image: ImageOptions
    @OptionGroup var out: OutputOption
    @Option(name: .customLong("start-offset"), help: "First byte to map.") var startOffset: String?
    @Option(name: .customLong("max-length"), help: "Bytes to map at most.") var maxLength: String?
    @Argument(help: "Image file name.") var filename: String

    func run() async throws {
        let json = try out.isJSON
        let start = try startOffset.map { try tool.parseSize($0, what: "start offset") } ?? 0
        let length = try maxLength.map { try tool.parseSize($0, what: "max length") }
        let node = try await image.open(filename)
        try await closing(node) {
            do {
                try await BlockMap.render(node, format: json ? .json : .human, start: start, maxLength: length) { writeStdout($0) }
            } catch let e as BlockError {
                throw tool.fail(e.message)
            }
        }
    }
}
