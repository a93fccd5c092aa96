import ArgumentParser
import QBlock
import ToolSupport

struct ImgCheck: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "check", abstract: "Check an image for consistency.")

    @OptionGroup var image: ImageOptions
    @OptionGroup var out: OutputOption
    @Option(name: .customShort("r"), help: "Repair: leaks or all.") var repair: String?
    @Flag(name: .customShort("q"), help: "Quiet.") var quiet = false
    @Argument(help: "Image file name.") var filename: String

    func run() async throws {
        let json = try out.isJSON
        var mode: CheckRepair?
        if let repair {
            guard let m = CheckRepair(rawValue: repair) else {
                throw tool.usageError("Unknown option value for -r (expecting 'leaks' or 'all'): \(repair)")
            }
            mode = m
        }
        let node = try await image.open(filename, readOnly: mode == nil, forRepair: mode != nil)
        let outcome = try await closing(node) {
            do {
                return try await ImageCheckReport.run(node, repair: mode) { writeStderr($0 + "\n") }
            } catch let e as BlockError {
                if e.message == ImageCheckReport.notSupportedMessage {
                    throw tool.fail(e.message, code: ImageCheckReport.notSupportedExitCode)
                }
                throw tool.fail("Check failed: \(e.message)")
            }
        }
        let report = outcome.report
        if let fixed = outcome.repaired, !json, !quiet {
            writeStdout(ImageCheckReport.repairedText(leaks: fixed.leaks, corruptions: fixed.corruptions))
        }
        if !quiet { writeStdout(json ? report.jsonText : report.humanText) }
        if report.result.checkErrors != 0 { throw tool.fail("Check failed") }
        throw ExitCode(report.exitCode)
    }
}
