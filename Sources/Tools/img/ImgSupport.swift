import ArgumentParser
import QBlock
import ToolSupport

/// Options most subcommands share.
struct ImageOptions: ParsableArguments {
    @Option(name: .customShort("f"), help: "Image format (raw, qcow2); probed when omitted.")
    var format: String?

    @Flag(name: [.customShort("U"), .customLong("force-share")], help: "Open the image shared with other writers.")
    var forceShare = false

    @Flag(name: .customLong("image-opts"), help: "The file name is an option string (driver=qcow2,file.filename=...).")
    var imageOpts = false

    @Option(name: .customLong("object"), help: "Create a user object (secret,id=ID,data=...); repeatable.")
    var objects: [String] = []

    /// Opens `filename` for reading (or writing), reporting failures as qemu-img does: a
    /// plain or `json:` file name, or with `--image-opts` an option string.
    func open(_ filename: String, readOnly: Bool = true, openBacking: Bool = true,
              cache: CacheMode = .writeback, forRepair: Bool = false) async throws -> any BlockDriver {
        try checkObjects()
        if imageOpts && format != nil {
            throw tool.fail("--image-opts and --format are mutually exclusive")
        }
        if forceShare && !readOnly {
            throw tool.fail("force-share=on can only be used with read-only images")
        }
        if let format, !ImageOpener.formats.contains(format) {
            throw tool.fail("Unknown file format '\(format)'")
        }
        if forceShare && imageOpts, let given = (try? DriveOptions.parse(filename, impliedKey: "file"))?["force-share"],
           given != .string("on") {
            throw tool.fail("--force-share/-U conflicts with image options")
        }
        let options = OpenOptions(format: format, readOnly: readOnly, cache: cache, forceShare: forceShare,
                                  openBacking: openBacking, allowCorrupt: forRepair, forRepair: forRepair)
        return try await openImage(filename, options: options, imageOpts: imageOpts, warnings: true)
    }

    /// Creates the `--object` objects (qemu-img checks them before anything else).
    func checkObjects() throws {
        do { _ = try ImageSpec.objects(objects) } catch let e as BlockError { throw tool.fail(e.message) }
    }
}

/// Opens an image with exact options (the format named is used as is: an unknown one is
/// reported as QEMU's "Unknown driver"), printing qemu-img's message and exiting with
/// `exitCode` on failure; with `warnings`, qemu-img's warnings about stale bitmaps and a
/// probed raw image opened for writing are printed. `name` may be a `json:` file name, or with `imageOpts` an
/// `--image-opts` option string.
func openImage(_ name: String, options: OpenOptions, imageOpts: Bool = false, exitCode: Int32 = 1,
               warnings: Bool = false) async throws -> any BlockDriver {
    do {
        let node = try await ImageSpec.open(name, imageOpts: imageOpts, options: options, warning: ImageSpec.printWarning(tool))
        guard warnings else { return node }
        tool.warnAboutStaleBitmaps(node)
        if options.format == nil && node.driverName == "raw" && !options.readOnly && !imageOpts && !DriveOptions.isJSONFilename(name) {
            writeStderr(ToolProgram.rawProbeWarning(name))
        }
        return node
    } catch let e as BlockError {
        let message: String
        if ImageSpec.isDriveSpec(name, imageOpts: imageOpts) || e.message.hasPrefix("Could not open backing file") {
            message = "Could not open '\(name)': " + e.message
        } else {
            message = ToolProgram.openErrorMessage(e, name)
        }
        throw tool.fail(message, code: exitCode)
    }
}

/// `--output=human|json`.
struct OutputOption: ParsableArguments {
    @Option(name: .customLong("output"), help: "Output format: human or json.")
    var output = "human"

    var isJSON: Bool {
        get throws {
            switch output {
            case "human": return false
            case "json": return true
            default: throw tool.fail("--output must be used with human or json as argument.")
            }
        }
    }
}

/// Closes a node, ignoring errors (qemu-img does not report them either).
func closeQuietly(_ node: any BlockDriver) async {
    try? await node.close()
}

/// Runs `body`, then closes `nodes` quietly (in order; nil ones are skipped), whether
/// `body` returned or threw: qemu-img closes its images on every way out.
func closing<T>(_ nodes: (any BlockDriver)?..., do body: () async throws -> T) async throws -> T {
    let result: Result<T, any Error>
    do {
        result = .success(try await body())
    } catch {
        result = .failure(error)
    }
    for case let node? in nodes { await closeQuietly(node) }
    return try result.get()
}

/// Joins the `-o` arguments as qemu-img does while it reads its options, printing
/// "Invalid option list: ARG" for one that cannot be joined.
func accumulatedOptions(_ arguments: [String]) throws -> String? {
    do { return try ImageCreator.accumulateOptions(arguments) } catch let e as BlockError { throw tool.fail(e.message) }
}

/// When the joined `-o` options ask for help, prints `help()`'s listing and exits (status 1
/// and the message when it throws).
func printOptionHelpIfAsked(_ joined: String?, help: () throws -> String) throws {
    guard let joined, ImageCreator.hasHelpOption(joined) else { return }
    do {
        writeStdout(try help())
    } catch let e as BlockError {
        throw tool.fail(e.message)
    }
    throw ExitCode.success
}
