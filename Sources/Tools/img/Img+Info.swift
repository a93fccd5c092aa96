import ArgumentParser
import QBlock
import ToolSupport

struct ImgInfo: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "info", abstract: "Show information about an image.")

    @OptionGroup var image: ImageOptions
    @OptionGroup var out: OutputOption
    @Flag(name: .customLong("backing-chain"), help: "Show every image of the backing chain.") var backingChain = false
    @Argument(help: "Image file name.") var filename: String

    func run() async throws {
        let json = try out.isJSON
        var infos: [ImageInfo] = []
        var name = filename
        var format = image.format
        while true {
            if infos.contains(where: { $0.filename == name }) {
                throw tool.fail("Backing file '\(name)' creates an infinite loop.")
            }
            var opts = image
            opts.format = format
            // (Only the top image is named by the option string; its backing files by their names.)
            opts.imageOpts = image.imageOpts && infos.isEmpty
            let node = try await opts.open(name, openBacking: false)
            let info = ImageInfo(node: node)
            await closeQuietly(node)
            infos.append(info)
            guard backingChain, let next = info.fullBackingFilename else { break }
            name = next
            format = info.backingFormat
        }
        writeStdout(ImageInfo.render(infos, json: json, backingChain: backingChain))
    }
}
