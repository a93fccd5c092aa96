import ArgumentParser
import QBlock
import ToolSupport
#if canImport(Glibc)
import Glibc
#endif

struct ImgConvert: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "convert",
        abstract: "Convert one or more images (concatenated) into a new image of any format.")

    @Option(name: .customShort("f"), help: "Source format; probed when omitted.") var format: String?
    @Option(name: .customShort("O"), help: "Target format (default raw).") var outputFormat = "raw"
    @Option(name: .customShort("o"), help: "Target creation options, key=value[,...].") var options: [String] = []
    @Option(name: .customShort("B"), help: "Backing file of the target.") var backing: String?
    @Option(name: .customShort("F"), help: "Format of the target's backing file.") var backingFormat: String?
    @Flag(name: .customShort("c"), help: "Compress the target (qcow2).") var compress = false
    @Flag(name: .customShort("n"), help: "Do not create the target; it must exist.") var skipCreate = false
    @Flag(name: .customLong("target-is-zero"), help: "The existing target reads as zeros (with -n).") var targetIsZero = false
    @Option(name: .customShort("S"), help: "Zero runs of this many bytes become holes (0: fully allocate).") var sparseSize: String?
    @Option(name: .customShort("m"), help: "Requests in flight (1-16).") var coroutines: String?
    @Flag(name: .customShort("W"), help: "Allow out-of-order writes.") var outOfOrder = false
    @Flag(name: .customShort("p"), help: "Show progress.") var progress = false
    @Flag(name: .customShort("q"), help: "Quiet.") var quiet = false
    @Option(name: .customShort("t"), help: "Target cache mode (default unsafe).") var cache: String?
    @Option(name: .customShort("T"), help: "Source cache mode (default writeback).") var sourceCache: String?
    @Flag(name: [.customShort("U"), .customLong("force-share")], help: "Open the sources shared.") var forceShare = false
    @Option(name: .customShort("l"), help: "Convert this internal snapshot (ID_OR_NAME or snapshot.id=,snapshot.name=).") var snapshot: String?
    @Option(name: .customShort("s"), help: "Convert this internal snapshot (deprecated form of -l).") var snapshotLegacy: String?
    @Flag(name: .customLong("bitmaps"), help: "Copy the source's persistent bitmaps.") var bitmaps = false
    @Flag(name: .customLong("skip-broken-bitmaps"), help: "With --bitmaps, skip inconsistent bitmaps.") var skipBrokenBitmaps = false
    @Flag(name: .customShort("C"), help: "Copy offloading (refused: not supported).") var copyOffload = false
    @Flag(name: .customLong("salvage"), help: "Read errors in the sources are not fatal: unreadable sectors become zeros.") var salvage = false
    @Argument(help: "Source images, then the target.") var files: [String] = []

    func run() async throws {
        let joinedOptions = try accumulatedOptions(options)
        var o = ConvertOptions()
        o.snapshot = snapshot ?? snapshotLegacy
        o.sourceFormat = format
        o.targetFormat = outputFormat
        o.createOptions = options.flatMap { ImageCreator.parseOptionString($0) }
        o.backingFile = backing
        o.backingFormat = backingFormat
        o.compress = compress
        o.skipCreate = skipCreate
        o.targetIsZero = targetIsZero
        o.outOfOrderWrites = outOfOrder
        o.forceShare = forceShare
        o.bitmaps = bitmaps
        o.skipBrokenBitmaps = skipBrokenBitmaps
        o.salvage = salvage
        o.quiet = quiet
        o.warning = { tool.printError("warning: \($0)") }
        if let coroutines {
            guard let m = Int(coroutines), m >= 1, m <= Convert.maxParallelRequests else {
                throw tool.fail("Invalid number of coroutines. Allowed number of coroutines is between 1 and \(Convert.maxParallelRequests)")
            }
            o.parallelRequests = m
        }
        if let sparseSize {
            guard let s = SizeParser.parse(sparseSize) else {
                throw tool.fail("Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to \(Convert.maxBufferSectors * 512). Select 0 to disable sparse detection (fully allocates output).")
            }
            o.minSparse = s
        }
        if let cache {
            guard let m = CacheMode(qemuName: cache) else { throw tool.fail("Invalid cache option: \(cache)") }
            o.targetCache = m
        }
        let sources = Array(files.dropLast())
        let target = files.last ?? ""
        if skipBrokenBitmaps && !bitmaps { throw tool.fail("Use of --skip-broken-bitmaps requires --bitmaps") }
        if copyOffload {
            if compress { throw tool.fail("Cannot enable copy offloading when -c is used") }
            if sparseSize != nil { throw tool.fail("Cannot enable copy offloading when -S is used") }
            if salvage { throw tool.fail("Cannot use copy offloading in salvaging mode") }
        }
        do {
            // (Every check but the one for sources comes before -o help.)
            try o.validate(sourceCount: max(1, sources.count))
        } catch let e as BlockError {
            throw tool.fail(e.message)
        }
        try printOptionHelpIfAsked(joinedOptions) {
            try ImageCreator.optionHelp(format: outputFormat, filename: files.count >= 2 ? target : nil)
        }
        do {
            try o.validate(sourceCount: sources.count)
        } catch let e as BlockError {
            throw tool.fail(e.message)
        }
        if copyOffload { throw tool.fail("Copy offloading (-C) is not supported by this implementation") }
        if let sourceCache {
            guard let m = CacheMode(qemuName: sourceCache) else { throw tool.fail("Invalid source cache option: \(sourceCache)") }
            o.sourceCache = m
        }
        let show = progress && !quiet
        let printer: (@Sendable (Double) -> Void)? = show ? printProgress : nil
        do {
            try await Convert.run(sources: sources, target: target, options: o, progress: printer)
        } catch let e as BlockError {
            if show { writeStdout("\n") }
            throw tool.fail(e.message)
        }
        if show { writeStdout("\n") }
    }
}
