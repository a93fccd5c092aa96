import ArgumentParser
import QBlock
import ToolSupport
#if canImport(Glibc)
import Glibc
#endif

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
        let args = preprocess(Array(CommandLine.arguments.dropFirst()))
        do {
            var command = try parseAsRoot(args)
            if var asyncCommand = command as? AsyncParsableCommand {
                try await asyncCommand.run()
            } else {
                try command.run()
            }
        } catch let code as ExitCode {
            Glibc.exit(code.rawValue)
        } catch let e as BlockError {
            printError(e.message)
            Glibc.exit(1)
        } catch {
            if exitCode(for: error) == .success { exit(withError: error) }
            // Usage errors: one line as qemu-img's error_exit words them, exit 1.
            let message = fullMessage(for: error).split(separator: "\n").first.map(String.init) ?? "\(error)"
            printError(message.hasPrefix("Error: ") ? String(message.dropFirst(7)) : message)
            writeStderr("Try 'img --help' for more information\n")
            Glibc.exit(1)
        }
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
