import ArgumentParser
import QBlock
import ToolSupport

struct ImgDD: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "dd",
        abstract: "Copy (part of) an image into a new image, dd style.")

    @Option(name: .customShort("f"), help: "Input format; probed when omitted.") var format: String?
    @Option(name: .customShort("O"), help: "Output format (default raw).") var outputFormat = "raw"
    @Flag(name: [.customShort("U"), .customLong("force-share")], help: "Open the input shared.") var forceShare = false
    @Argument(help: "Operands: if=FILE of=FILE [bs=N] [count=N] [skip=N].") var operands: [String] = []

    func run() async throws {
        var o = DDOptions()
        o.inputFormat = format
        o.outputFormat = outputFormat
        o.forceShare = forceShare
        do {
            for a in operands { try o.parseOperand(a) }
            if let format, !ImageOpener.formats.contains(format), o.input != nil, o.output != nil {
                throw BlockError(.invalidArgument, "Unknown file format '\(format)'")
            }
            try await DD.run(o) { tool.printError($0) }
        } catch let e as BlockError {
            throw tool.failEachLine(e.message)
        }
    }
}
