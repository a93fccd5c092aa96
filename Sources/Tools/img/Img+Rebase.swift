import ArgumentParser
import QBlock
import ToolSupport

struct ImgRebase: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "rebase", abstract: "Change the backing file of an image.")

    @Option(name: .customShort("f"), help: "Image format.") var format: String?
    @Option(name: .customShort("F"), help: "Format of the new backing file.") var backingFormat: String?
    @Option(name: .customShort("b"), help: "New backing file (\"\" for none).") var backing: String?
    @Option(name: .customShort("t"), help: "Cache mode for the image.") var cache: String?
    @Option(name: .customShort("T"), help: "Cache mode for the backing files.") var sourceCache: String?
    @Flag(name: .customShort("u"), help: "Unsafe: only rewrite the header.") var unsafe = false
    @Flag(name: .customShort("p"), help: "Show progress.") var progress = false
    @Flag(name: .customShort("q"), help: "Quiet.") var quiet = false
    @Flag(name: [.customShort("U"), .customLong("force-share")], help: "Open shared (not allowed: the image is written).") var forceShare = false
    @Flag(name: .customLong("image-opts"), help: "The file name is an option string (driver=qcow2,file.filename=...).") var imageOpts = false
    @Option(name: .customLong("object"), help: "Create a user object (secret,id=ID,data=...); repeatable.") var objects: [String] = []
    @Argument(help: "Image file name.") var files: [String] = []

    func run() async throws {
        guard files.count == 1 else { throw tool.usageError(files.isEmpty ? "Expecting one image file name" : "Expecting one image file name") }
        do { _ = try ImageSpec.objects(objects) } catch let e as BlockError { throw tool.fail(e.message) }
        if imageOpts && format != nil { throw tool.fail("--image-opts and --format are mutually exclusive") }
        let filename = files[0]
        if !unsafe && backing == nil { throw tool.usageError("Must specify backing file (-b) or use unsafe mode (-u)") }
        if forceShare { throw tool.fail("force-share=on can only be used with read-only images") }
        // (As qemu-img: any driver QEMU has is a valid name; opening it is another matter.)
        if let f = backingFormat, !ImageOpener.qemuDriverNames.contains(f) { throw tool.fail("Invalid format name: '\(f)'") }
        var mode = CacheMode.writeback
        if let c = cache {
            guard let m = CacheMode(qemuName: c) else { throw tool.fail("Invalid cache option: \(c)") }
            mode = m
        }
        if let c = sourceCache, CacheMode(qemuName: c) == nil { throw tool.fail("Invalid source cache option: \(c)") }
        let newName = (backing?.isEmpty ?? true) ? nil : backing
        // Checked before anything is written, so that a refused rebase leaves the image unchanged.
        if let newName, backingFormat == nil {
            throw tool.fail("Could not change the backing file to '\(newName)': backing format must be specified")
        }
        let image = try await openImage(filename, options: OpenOptions(format: format, readOnly: false, cache: mode,
                                                                        openBacking: !unsafe), imageOpts: imageOpts)
        try await closing(image) {
            var newBacking: (any BlockDriver)?
            if !unsafe, let newName {
                let full = ImageOpener.resolveBackingPath(newName, relativeTo: filename)
                do {
                    newBacking = try await ImageOpener.open(full, options: OpenOptions(format: backingFormat, readOnly: true, cache: mode))
                } catch let e as BlockError {
                    throw tool.fail("Could not open new backing file '\(newName)': " + e.message)
                }
            }
            let showProgress = progress && !quiet
            try await closing(newBacking) {
                do {
                    if unsafe {
                        try await ImageRebase.changeBackingFile(of: image, to: newName, format: newName == nil ? nil : backingFormat)
                    } else {
                        try await ImageRebase.rebase(image, onto: newBacking, backingName: newName,
                                                     backingFormat: newName == nil ? nil : backingFormat,
                                                     progress: showProgress ? { printProgress($0) } : nil)
                        if showProgress { writeStdout("\n") }
                    }
                } catch let e as BlockError {
                    throw tool.fail(e.message)
                }
            }
        }
    }
}
