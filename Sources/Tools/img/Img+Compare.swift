import ArgumentParser
import QBlock
import ToolSupport
#if canImport(Glibc)
import Glibc
#endif

struct ImgCompare: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "compare", abstract: "Check whether two images have the same content.")

    @Option(name: .customShort("f"), help: "Format of the first image.") var format1: String?
    @Option(name: .customShort("F"), help: "Format of the second image.") var format2: String?
    @Option(name: .customShort("T"), help: "Cache mode for the images.") var cache: String?
    @Flag(name: .customShort("s"), help: "Strict mode: allocation and size must match too.") var strict = false
    @Flag(name: .customShort("p"), help: "Show progress.") var progress = false
    @Flag(name: .customShort("q"), help: "Quiet.") var quiet = false
    @Flag(name: [.customShort("U"), .customLong("force-share")], help: "Open the images shared with other writers.") var forceShare = false
    @Flag(name: .customLong("image-opts"), help: "The file names are option strings (driver=qcow2,file.filename=...).") var imageOpts = false
    @Option(name: .customLong("object"), help: "Create a user object (secret,id=ID,data=...); repeatable.") var objects: [String] = []
    @Argument(help: "The two images.") var files: [String] = []

    func run() async throws {
        guard files.count == 2 else { throw tool.usageError("Expecting two image file names") }
        var mode = CacheMode.writeback
        if let cache {
            guard let m = CacheMode(qemuName: cache) else { throw tool.fail("Invalid source cache option: \(cache)", code: 2) }
            mode = m
        }
        do { _ = try ImageSpec.objects(objects) } catch let e as BlockError { throw tool.fail(e.message, code: 2) }
        let showProgress = progress && !quiet
        let a = try await openOrExit(files[0], format: format1, cache: mode, code: 2)
        let result = try await closing(a) {
            let b = try await openOrExit(files[1], format: format2, cache: mode, code: 2)
            return try await closing(b) {
                var tailChecked = false
                do {
                    return try await ImageCompare.compare(a, b, strict: strict, progress: showProgress ? { printProgress($0) } : nil,
                                                          sizeMismatch: { tailChecked = true })
                } catch let e as BlockError {
                    let exit = tool.fail(e.message, code: e.operation == "read" ? 4 : 3)
                    // qemu-img printed its size warning before the tail failed, on stdout,
                    // which reaches the terminal after the error at exit.
                    if tailChecked && !quiet { writeStdout("Warning: Image size mismatch!\n") }
                    throw exit
                }
            }
        }
        if showProgress { writeStdout("\n") }
        if !quiet { writeStdout(result.reportText) }
        if !result.identical { throw ExitCode(1) }
    }

    /// A read-only open with `-U`.
    func openOrExit(_ name: String, format: String?, cache: CacheMode, code: Int32) async throws -> any BlockDriver {
        if imageOpts && format != nil { throw tool.fail("--image-opts and --format are mutually exclusive", code: code) }
        return try await openImage(name, options: OpenOptions(format: format, readOnly: true, cache: cache, forceShare: forceShare),
                                   imageOpts: imageOpts, exitCode: code)
    }
}
