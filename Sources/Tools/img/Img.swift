import ArgumentParser
import QBlock
import ToolSupport

/// How `img` reports errors: "img: message", as qemu-img's `error_report`.
let tool = ToolProgram.invoked(as: "img")

/// `img`: a qemu-img work-alike over the QBlock library.
@main
struct Img: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "img",
        abstract: "Create, inspect, check and resize disk images (qemu-img compatible).",
        subcommands: [ImgCreate.self, ImgInfo.self, ImgCheck.self, ImgMap.self, ImgResize.self, ImgBench.self,
                      ImgCompare.self, ImgRebase.self, ImgCommit.self, ImgAmend.self, ImgSnapshot.self,
                      ImgConvert.self, ImgMeasure.self, ImgDD.self, ImgBitmap.self, ImgMirrorFinish.self])

    static func main() async {
        await tool.main(Img.self, arguments: preprocess(Array(CommandLine.arguments.dropFirst())))
    }

    /// qemu-img takes the last argument of `resize` as the size even when it starts with a
    /// dash ("-512k"); mark it as a positional argument so that it is not read as an option.
    static func preprocess(_ args: [String]) -> [String] {
        guard args.first == "resize", args.count >= 3, let last = args.last,
              last.hasPrefix("-"), last != "--", args[args.count - 2] != "--",
              last.dropFirst().first.map({ $0.isNumber || $0 == "." }) == true else { return args }
        return args.dropLast() + ["--", last]
    }
}
