import ArgumentParser
import QBlock
import ToolSupport

/// `img mirror-finish`: completes, offline, a mirror whose process died, from the mirror's
/// persistent dirty bitmap (`drive-mirror ... "x-bitmap-file": FILE`). Not in qemu-img,
/// which has no persistent mirror bitmap; the name says what it does to a mirror.
struct ImgMirrorFinish: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "mirror-finish",
        abstract: "Copy the clusters a crashed mirror's bitmap file marks dirty from the source to the target.")

    @Option(name: .customShort("b"), help: "The mirror's bitmap side file (x-bitmap-file).") var bitmapFile: String
    @Option(name: .customShort("f"), help: "Source format.") var sourceFormat: String?
    @Option(name: .customShort("F"), help: "Target format.") var targetFormat: String?
    @Flag(name: .customShort("p"), help: "Show progress.") var progress = false
    @Flag(name: .customShort("q"), help: "Quiet.") var quiet = false
    @Argument(help: "SOURCE TARGET") var files: [String] = []

    func run() async throws {
        guard files.count == 2 else { throw tool.usageError("Expecting a source and a target image") }
        let source: any BlockDriver
        let target: any BlockDriver
        do {
            source = try await ImageOpener.open(files[0], options: OpenOptions(format: sourceFormat, readOnly: true))
        } catch let e as BlockError { throw tool.fail(ToolProgram.openErrorMessage(e, files[0])) }
        do {
            target = try await ImageOpener.open(files[1], options: OpenOptions(format: targetFormat, readOnly: false))
        } catch let e as BlockError {
            try? await source.close()
            throw tool.fail(ToolProgram.openErrorMessage(e, files[1]))
        }
        let show = progress && !quiet
        let result: MirrorFinish.Result
        do {
            result = try await MirrorFinish.finish(source: source, target: target, bitmapFile: bitmapFile,
                                                   progress: show ? { printProgress($0) } : nil)
        } catch let e as BlockError {
            try? await target.close()
            try? await source.close()
            throw tool.fail(e.message)
        }
        try await target.close()
        try await source.close()
        if show { writeStdout("\n") }
        if !quiet {
            if result.dirtyBytes == 0 {
                writeStdout("The target is a complete copy; nothing to copy.\n")
            } else {
                writeStdout("Copied \(result.copiedBytes) dirty bytes of \(result.size); the target is a complete copy.\n")
            }
        }
    }
}
