#if canImport(Glibc)
import Glibc
#endif
import QBlockCore
import QBlockDrivers
import QBlockGraph
import QBlockOpen

/// Options of `qemu-img convert`, with its defaults.
public struct ConvertOptions: Sendable {
    /// Format of the sources (`-f`); nil probes each.
    public var sourceFormat: String?
    /// Format of the target (`-O`).
    public var targetFormat = "raw"
    /// Creation options (`-o`), in command-line order.
    public var createOptions: [(String, String)] = []
    /// Backing file of the new target (`-B`); unallocated source areas are then left unallocated.
    public var backingFile: String?
    /// Format of that backing file (`-F`).
    public var backingFormat: String?
    /// Write compressed clusters (`-c`, qcow2 only).
    public var compress = false
    /// Write into an existing target instead of creating it (`-n`).
    public var skipCreate = false
    /// The existing target reads as zeros already (`--target-is-zero`, with `-n`).
    public var targetIsZero = false
    /// Zero runs of at least this many bytes in data become holes (`-S`; 0 allocates everything).
    public var minSparse: Int64 = 4096
    /// Requests in flight (`-m`, 1 to 16).
    public var parallelRequests = 8
    /// Allow writes to complete out of order (`-W`).
    public var outOfOrderWrites = false
    /// Cache mode of the target (`-t`, default unsafe as in qemu-img convert).
    public var targetCache: CacheMode = .unsafe
    /// Cache mode of the sources (`-T`).
    public var sourceCache: CacheMode = .writeback
    /// Open the sources shared with other writers (`-U`).
    public var forceShare = false
    /// Copy an internal snapshot of the (single, qcow2) source instead of its current state
    /// (`-l`): "ID_OR_NAME" or "snapshot.id=ID,snapshot.name=NAME".
    public var snapshot: String?
    /// Copy the source's persistent bitmaps into the qcow2 target (`--bitmaps`).
    public var bitmaps = false
    /// With `bitmaps`, skip inconsistent bitmaps instead of failing (`--skip-broken-bitmaps`).
    public var skipBrokenBitmaps = false
    /// Read errors in the sources are not fatal (`--salvage`): a block status query that
    /// fails is retried on shorter ranges down to one sector, which is then read as data; a
    /// read that fails is retried sector by sector, and each sector that cannot be read is
    /// written as zeros. Each failing sector is reported to `warning` unless `quiet`.
    public var salvage = false
    /// Do not report the sectors `salvage` could not read (`-q`).
    public var quiet = false
    /// Receives warnings qemu-img prints as "warning: ..." (a skipped bitmap, a sector
    /// `salvage` could not read).
    public var warning: (@Sendable (String) -> Void)?

    /// Creates qemu-img convert's defaults: probe the sources, create a raw target, sparse at 4 KiB, 8 requests in flight.
    public init() {}

    /// The checks qemu-img makes on its arguments before opening anything.
    /// - Throws: ``BlockError`` `.invalidArgument` worded as qemu-img's message.
    public func validate(sourceCount: Int) throws {
        if parallelRequests < 1 || parallelRequests > Convert.maxParallelRequests {
            throw BlockError(.invalidArgument, "Invalid number of coroutines. Allowed number of coroutines is between 1 and \(Convert.maxParallelRequests)")
        }
        if minSparse < 0 || minSparse % 512 != 0 || minSparse / 512 > Convert.maxBufferSectors {
            throw BlockError(.invalidArgument, "Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to \(Convert.maxBufferSectors * 512). Select 0 to disable sparse detection (fully allocates output).")
        }
        if skipCreate && !createOptions.isEmpty {
            throw BlockError(.invalidArgument, "-o has no effect when skipping image creation")
        }
        if targetIsZero && !skipCreate {
            throw BlockError(.invalidArgument, "--target-is-zero requires use of -n flag")
        }
        if skipBrokenBitmaps && !bitmaps {
            throw BlockError(.invalidArgument, "Use of --skip-broken-bitmaps requires --bitmaps")
        }
        if sourceCount < 1 {
            throw BlockError(.invalidArgument, "Must specify image file name")
        }
    }
}

/// `qemu-img convert`: copies one or more sources, concatenated, into a new (or existing)
/// target of any supported format, keeping holes.
///
/// Allocation is read through block status, never by reading zeros: holes and zero
/// clusters of the sources stay holes in the target, unallocated areas are skipped when the
/// target has a backing file (`-B`), and data buffers are scanned for zero runs of at least
/// `minSparse` bytes, which become holes too (QEMU's `is_allocated_sectors_min`). Several
/// requests are in flight; unless `outOfOrderWrites`, writes to a qcow2 target complete in
/// guest order, so that its clusters are laid out sequentially. Compressed output is
/// compressed by the workers concurrently (CPU work spread over all cores) and only the
/// small allocation and write of the compressed bytes is ordered.
public enum Convert {
    /// qemu-img's limits: 16 coroutines, 32768-sector buffers.
    public static let maxParallelRequests = 16
    /// The largest copy buffer, in 512-byte sectors (16 MiB).
    public static let maxBufferSectors: Int64 = 32768
    /// The copy buffer of each request (qemu-img's IO_BUF_SIZE).
    static let bufferSize = 2 << 20

    /// Converts `sources` into `target`.
    /// - Parameter progress: called with the percentage done (0...100) as qemu-img's `-p` reports it.
    /// - Throws: ``BlockError`` whose message is what qemu-img prints after "qemu-img: ".
    public static func run(sources: [String], target: String, options: ConvertOptions,
                           progress: (@Sendable (Double) -> Void)? = nil) async throws {
        try options.validate(sourceCount: sources.count)
        progress?(0)
        var opened: [any BlockDriver] = []
        func closeAll() async { for n in opened { try? await n.close() } }
        for path in sources {
            do {
                let n = try await ImageOpener.open(path, options: OpenOptions(
                    format: options.sourceFormat, readOnly: true, cache: options.sourceCache, forceShare: options.forceShare))
                opened.append(n)
            } catch {
                await closeAll()
                throw openError(error, path)
            }
        }
        // `-l`: read a snapshot of the only source; the source node stays open underneath.
        var sourcesForCopy = opened
        if let spec = options.snapshot {
            guard opened.count == 1 else {
                await closeAll()
                throw BlockError(.invalidArgument, "No support for concatenating multiple snapshot")
            }
            do {
                sourcesForCopy = [try await InternalSnapshotView.open(spec, of: opened[0])]
            } catch {
                await closeAll()
                throw error
            }
        }
        if options.bitmaps {
            do { try checkSourceBitmaps(opened, skipBroken: options.skipBrokenBitmaps) } catch {
                await closeAll()
                throw error
            }
        }
        let sourceLengths = sourcesForCopy.map { qemuLength($0) }
        let total = sourceLengths.reduce(0, +)
        let targetNode: any BlockDriver
        let targetBacking: String?
        do {
            (targetNode, targetBacking) = try await prepareTarget(target, size: total, sourceCount: sources.count, options: options)
        } catch {
            await closeAll()
            throw error
        }
        let job: ConvertJob
        do {
            if options.bitmaps { try checkTargetBitmaps(targetNode) }
            let zeroInit = await hasZeroInit(targetNode)
            job = try ConvertJob(sources: sourcesForCopy, lengths: sourceLengths, target: targetNode, targetHasBacking: targetBacking != nil,
                                 targetZeroInit: zeroInit, options: options, progress: progress)
            try await job.run()
            if let q = targetNode as? any CompressedWriting, options.compress { try await q.finishCompressedWrites() }
            try await targetNode.flush()
            if options.bitmaps {
                try await copyBitmaps(from: opened[0], to: targetNode, skipBroken: options.skipBrokenBitmaps, warning: options.warning)
            }
        } catch {
            try? await targetNode.close()
            await closeAll()
            throw error
        }
        do {
            try await targetNode.close()
        } catch {
            await closeAll()
            throw error
        }
        await closeAll()
        progress?(100)
    }


    /// Whether a new image reads as zeros where nothing was written (QEMU's
    /// `bdrv_has_zero_init`): a host file does (a block device does not), qcow2 does unless
    /// its L2 tables are preallocated (then its file decides), raw as its file; other
    /// protocols (NBD) do not.
    static func hasZeroInit(_ node: any BlockDriver) async -> Bool {
        let n = node.innermostDriver
        if let f = n as? any HostStorage { return !f.isBlockDevice }
        if let q = n as? Qcow2Node {
            if await !q.hasPreallocatedL2Tables() { return true }
            guard let file = q.file else { return false }
            return await hasZeroInit(file)
        }
        if let r = n as? any PassThroughFormat { return await hasZeroInit(r.passedThrough) }
        return false
    }

    /// qemu-img's message for an image that could not be opened.
    static func openError(_ error: Error, _ filename: String) -> BlockError {
        var e = error.asBlockError
        let prefix = "Could not open '\(filename)': "
        if e.message.hasPrefix(prefix) {
            // The file layer's own "Could not open 'X': <errno text>" gets the prefix again.
            if e.errno != nil && e.operation == "open" { e.message = prefix + e.message }
        } else {
            e.message = prefix + e.message
        }
        return e
    }

    /// Creates (unless `-n`) and opens the target, with qemu-img's checks in its order.
    private static func prepareTarget(_ target: String, size: Int64, sourceCount: Int,
                                      options o: ConvertOptions) async throws -> (any BlockDriver, String?) {
        let format = o.targetFormat
        guard let driver = FormatRegistry.driver(named: format) else {
            let e = ImageOpener.creationRefusal(format: format)
            throw BlockError(e.code, e.message)
        }
        var backing = o.backingFile
        if !o.skipCreate {
            // `size` is always the sum of the sources; a `-o size=` is overridden.
            let pairs = o.createOptions.filter { $0.0 != "size" }
            let plan: ImageCreator.Plan
            do {
                plan = try await ImageCreator.prepare(format: format, path: target, size: size, options: pairs,
                                                      backingFile: o.backingFile, backingFormat: o.backingFormat,
                                                      openBacking: false)
            } catch {
                var e = error.asBlockError
                if e.message.hasPrefix("Backing file specified without backing format") {
                    if sourceCount > 1 {
                        e.message = "Having a backing file for the target makes no sense when concatenating multiple input images"
                    } else {
                        e.message = "Use of backing file requires explicit backing format"
                    }
                }
                throw e
            }
            backing = plan.values["backing_file"]
            if sourceCount > 1 && backing != nil {
                throw BlockError(.invalidArgument, "Having a backing file for the target makes no sense when concatenating multiple input images")
            }
            if o.compress {
                if !driver.supportsCompressedWrites {
                    throw BlockError(.unsupported, "Compression not supported for this file format")
                }
                if let p = plan.values["preallocation"], p != "off" {
                    throw BlockError(.invalidArgument, "Compression and preallocation not supported at the same time")
                }
            }
            do {
                try await ImageCreator.execute(plan)
            } catch {
                var e = error.asBlockError
                e.message = "\(target): error while converting \(format): \(e.message)"
                throw e
            }
        } else if o.targetIsZero && backing != nil {
            throw BlockError(.invalidArgument, "Cannot use --target-is-zero when the destination image has a backing file")
        } else if o.compress && !driver.supportsCompressedWrites {
            throw BlockError(.unsupported, "Compression not supported for this file format")
        }
        let node: any BlockDriver
        do {
            node = try await ImageOpener.open(target, options: OpenOptions(format: format, readOnly: false, cache: o.targetCache))
        } catch {
            throw openError(error, target)
        }
        if o.skipCreate && qemuLength(node) < size {
            try? await node.close()
            throw BlockError(.invalidArgument, "output file is smaller than input file")
        }
        return (node, backing)
    }
}
