import ArgumentParser
import QBlock
import ToolSupport

struct ImgAmend: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "amend", abstract: "Change format-specific options of an image.")

    @Option(name: .customShort("f"), help: "Image format.") var format: String?
    @Option(name: .customShort("o"), help: "Options (compat, lazy_refcounts, refcount_bits, size).") var options: [String] = []
    @Option(name: .customShort("t"), help: "Cache mode.") var cache: String?
    @Flag(name: .customShort("p"), help: "Show progress.") var progress = false
    @Flag(name: .customShort("q"), help: "Quiet.") var quiet = false
    @Flag(name: .customLong("force"), help: "Allow unsafe operations.") var force = false
    @Flag(name: .customLong("image-opts"), help: "The file name is an option string (driver=qcow2,file.filename=...).") var imageOpts = false
    @Option(name: .customLong("object"), help: "Create a user object (secret,id=ID,data=...); repeatable.") var objects: [String] = []
    @Argument(help: "Image file name.") var files: [String] = []

    func run() async throws {
        let joined: String
        do {
            guard let j = try ImageCreator.accumulateOptions(options) else { throw tool.usageError("Must specify options (-o)") }
            joined = j
        } catch let e as BlockError {
            throw tool.fail(e.message)
        }
        let wantsHelp = ImageCreator.hasHelpOption(joined)
        if wantsHelp, let format { try printAmendHelp(format) }
        guard files.count == 1 else { throw tool.fail("Expecting one image file name") }
        do { _ = try ImageSpec.objects(objects) } catch let e as BlockError { throw tool.fail(e.message) }
        if imageOpts && format != nil { throw tool.fail("--image-opts and --format are mutually exclusive") }
        var mode = CacheMode.writeback
        if let c = cache {
            guard let m = CacheMode(qemuName: c) else { throw tool.fail("Invalid cache option: \(c)") }
            mode = m
        }
        let pairs = ImageCreator.parseOptionString(joined)
        let image = try await openImage(files[0], options: OpenOptions(format: format, readOnly: false, cache: mode, openBacking: false),
                                        imageOpts: imageOpts)
        try await closing(image) {
            if wantsHelp { try printAmendHelp(image.driverName) }
            guard let q = image as? any Amendable else {
                throw tool.fail("Format driver '\(image.driverName)' does not support option amendment")
            }
            do {
                try await q.amend(options: pairs)
            } catch let e as BlockError {
                // (A snapshot L1 table that fails its check is reported on a line of its own
                // before the amend failure, as qemu-img does.)
                if let inner = e.underlying as? BlockError, inner.operation == Qcow2Node.validateSnapshotL1Operation {
                    tool.printError(inner.message)
                }
                throw tool.fail(e.message)
            }
        }
    }

    /// Prints the amend options of `format` and exits (1 with qemu-img's message if it has none).
    private func printAmendHelp(_ format: String) throws -> Never {
        do {
            writeStdout(try ImageCreator.amendOptionHelp(format: format))
        } catch let e as BlockError {
            throw tool.fail(e.message)
        }
        throw ExitCode.success
    }
}
