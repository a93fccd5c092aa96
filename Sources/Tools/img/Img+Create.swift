import ArgumentParser
import QBlock
import ToolSupport
#if canImport(Glibc)
import Glibc
#endif

struct ImgCreate: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "create", abstract: "Create an image.")

    @Option(name: .customShort("f"), help: "Image format (raw, qcow2).") var format = "raw"
    @Option(name: .customShort("b"), help: "Backing file.") var backing: String?
    @Option(name: .customShort("F"), help: "Backing file format.") var backingFormat: String?
    @Option(name: .customShort("o"), help: "Format options, key=value[,...].") var options: [String] = []
    @Flag(name: .customShort("u"), help: "Do not open the backing file (a size is needed then).") var unsafe = false
    @Flag(name: .customShort("q"), help: "Quiet.") var quiet = false
    @Option(name: .customLong("object"), help: "Create a user object (secret,id=ID,data=...); repeatable.") var objects: [String] = []
    @Argument(help: "Image file name.") var filename: String?
    @Argument(help: "Size (k, M, G, T, P, E suffixes).") var size: String?

    func run() async throws {
        // (qemu-img creates the objects while it reads its options, before anything else.)
        do { _ = try ImageSpec.objects(objects) } catch let e as BlockError { throw tool.fail(e.message) }
        let joined = try accumulatedOptions(options)
        try printOptionHelpIfAsked(joined) { try ImageCreator.optionHelp(format: format, filename: filename) }
        guard let filename else { throw tool.usageError("Expecting image file name") }
        let sizeValue = try size.map { try tool.parseSize($0, what: "image size") }
        let pairs = options.flatMap { ImageCreator.parseOptionString($0) }
        do {
            let plan = try await ImageCreator.prepare(format: format, path: filename, size: sizeValue, options: pairs,
                                                      backingFile: backing, backingFormat: backingFormat, openBacking: !unsafe)
            if !quiet { writeStdout(plan.formattingLine + "\n") }
            try await ImageCreator.execute(plan)
        } catch let e as BlockError {
            if e.message.contains("\nDetected format of ") {
                // qemu-img prints this hint without a final newline; so do we, byte for byte.
                flushStdout()
                writeStderr("\(tool.name): \(filename): \(e.message)")
                throw ExitCode.failure
            }
            throw tool.fail("\(filename): \(e.message)")
        }
    }
}
