import ArgumentParser
import QBlock
import ToolSupport

struct ImgMeasure: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "measure",
        abstract: "Compute the file size a new image needs (from a size or an existing image).")

    @OptionGroup var out: OutputOption
    @Option(name: .customShort("f"), help: "Source format; probed when omitted.") var format: String?
    @Option(name: .customShort("O"), help: "Target format (default raw).") var outputFormat = "raw"
    @Option(name: .customShort("o"), help: "Target creation options, key=value[,...].") var options: [String] = []
    @Option(name: .customLong("size"), parsing: .unconditional, help: "Virtual size of a new image.") var size: String?
    @Flag(name: [.customShort("U"), .customLong("force-share")], help: "Open the image shared.") var forceShare = false
    @Flag(name: .customLong("image-opts"), help: "The file name is an option string (driver=qcow2,file.filename=...).") var imageOpts = false
    @Option(name: .customLong("object"), help: "Create a user object (secret,id=ID,data=...); repeatable.") var objects: [String] = []
    @Argument(help: "Source image.") var files: [String] = []

    func run() async throws {
        let json = try out.isJSON
        var sizeValue: Int64?
        if let size { sizeValue = try tool.parseSize(size, what: "image size") }
        if files.count > 1 { throw tool.fail("At most one filename argument is allowed.") }
        let filename = files.first
        do { _ = try ImageSpec.objects(objects) } catch let e as BlockError { throw tool.fail(e.message) }
        if filename == nil && (format != nil || imageOpts) { throw tool.fail("--image-opts, -f, and -l require a filename argument.") }
        if filename != nil && sizeValue != nil { throw tool.fail("--size N cannot be used together with a filename.") }
        if filename == nil && sizeValue == nil { throw tool.fail("Either --size N or one filename must be specified.") }
        var node: (any BlockDriver)?
        if let filename {
            if imageOpts && format != nil { throw tool.fail("--image-opts and --format are mutually exclusive") }
            if let format, !ImageOpener.formats.contains(format) { throw tool.fail("Unknown file format '\(format)'") }
            node = try await openImage(filename, options: OpenOptions(format: format, readOnly: true, forceShare: forceShare),
                                       imageOpts: imageOpts)
        }
        let pairs = options.flatMap { ImageCreator.parseOptionString($0) }
        let result = try await closing(node) {
            do {
                return try await Measure.measure(format: outputFormat, options: pairs, size: sizeValue, source: node)
            } catch let e as BlockError {
                throw tool.failEachLine(e.message)
            }
        }
        writeStdout(json ? result.jsonText : result.humanText)
    }
}
