import ArgumentParser
import QBlock
import ToolSupport

/// Options most subcommands share.
struct ImageOptions: ParsableArguments {
    @Option(name: .customShort("f"), help: "Image format (raw, qcow2); probed when omitted.")
    var format: String?

    @Flag(name: [.customShort("U"), .customLong("force-share")], help: "Open the image shared with other writers.")
    var forceShare = false

    /// Opens `filename` for reading (or writing), reporting failures as qemu-img does.
    func open(_ filename: String, readOnly: Bool = true, openBacking: Bool = true,
              cache: CacheMode = .writeback, forRepair: Bool = false) async throws -> any BlockDriver {
        if forceShare && !readOnly {
            throw tool.fail("force-share=on can only be used with read-only images")
        }
        if let format, !ImageOpener.formats.contains(format) {
            throw tool.fail("Unknown file format '\(format)'")
        }
        let options = OpenOptions(format: format, readOnly: readOnly, cache: cache, forceShare: forceShare,
                                  openBacking: openBacking, allowCorrupt: forRepair, forRepair: forRepair)
        do {
            let node = try await ImageOpener.open(filename, options: options)
            tool.warnAboutStaleBitmaps(node)
            if format == nil && node.driverName == "raw" && !readOnly {
                writeStderr(ToolProgram.rawProbeWarning(filename))
            }
            return node
        } catch let e as BlockError {
            throw tool.fail(ToolProgram.openErrorMessage(e, filename))
        }
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
