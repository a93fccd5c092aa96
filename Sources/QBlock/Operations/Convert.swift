#if canImport(Glibc)
import Glibc
#endif

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
        if targetIsZero && !skipCreate {
            throw BlockError(.invalidArgument, "--target-is-zero requires use of -n flag")
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
            guard let q = opened[0] as? Qcow2Node else {
                await closeAll()
                throw BlockError(.unsupported, "Failed to load snapshot: Block format '\(opened[0].driverName)' used by device '' does not support internal snapshots")
            }
            do {
                let (id, name) = parseSnapshotSpec(spec)
                sourcesForCopy = [try await (id == nil && name == nil
                    ? q.snapshotReader(idOrName: spec) : q.snapshotReader(id: id, name: name))]
            } catch {
                await closeAll()
                throw BlockError(.notFound, "Failed to load snapshot: \(error.asBlockError.message)")
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
            job = try ConvertJob(sources: sourcesForCopy, lengths: sourceLengths, target: targetNode, targetHasBacking: targetBacking != nil,
                                 options: options, progress: progress)
            try await job.run()
            if let q = targetNode as? Qcow2Node, options.compress { try await q.finishCompressedWrites() }
            try await targetNode.flush()
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

    /// Splits "snapshot.id=X,snapshot.name=Y" (either part optional); plain text gives (nil, nil).
    static func parseSnapshotSpec(_ spec: String) -> (String?, String?) {
        guard spec.hasPrefix("snapshot.") else { return (nil, nil) }
        var id: String?, name: String?
        for part in spec.split(separator: ",") {
            if part.hasPrefix("snapshot.id=") { id = String(part.dropFirst("snapshot.id=".count)) }
            if part.hasPrefix("snapshot.name=") { name = String(part.dropFirst("snapshot.name=".count)) }
        }
        return (id, name)
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
        guard ImageCreator.formats.contains(format) else {
            throw BlockError(.invalidArgument, "Unknown file format '\(format)'")
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
                if format != "qcow2" {
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
        } else if o.compress && format != "qcow2" {
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

/// What a run of the source is, for the copy (qemu-img's `ImgConvertBlockStatus`).
enum ConvertChunkStatus {
    case data, zero, backing
}

/// Hands write turns out in ticket order (qemu-img's in-order writes without `-W`).
final class ConvertTurnstile: @unchecked Sendable {
    private let lock = PosixMutex()
    private var current: Int64 = 0
    private var waiters: [Int64: UnsafeContinuation<Void, Never>] = [:]

    func wait(for ticket: Int64) async {
        if lock.withLock({ current == ticket }) { return }
        await withUnsafeContinuation { (c: UnsafeContinuation<Void, Never>) in
            let now: Bool = lock.withLock {
                if current == ticket { return true }
                waiters[ticket] = c
                return false
            }
            if now { c.resume() }
        }
    }

    /// Ends the turn of `ticket` (which must hold it) and wakes the next one.
    func done(_ ticket: Int64) {
        let next: UnsafeContinuation<Void, Never>? = lock.withLock {
            current = ticket + 1
            return waiters.removeValue(forKey: current)
        }
        next?.resume()
    }
}

/// One conversion in progress: the iteration over the sources (under `iterLock`) and the
/// workers that copy the chunks it hands out.
final class ConvertJob: @unchecked Sendable {
    struct Chunk {
        var offset: Int64
        var length: Int64
        var status: ConvertChunkStatus
        var ticket: Int64
    }

    let sources: [any BlockDriver]
    let starts: [Int64]
    let lengths: [Int64]
    let total: Int64
    let target: any BlockDriver
    let qcow2Target: Qcow2Node?
    let options: ConvertOptions
    let compress: Bool
    let clusterSize: Int64
    let targetHasBacking: Bool
    /// Size of the target's backing file (past it, zeros need not be written); -1 if none.
    let targetBackingLength: Int64
    let hasZeroInit: Bool
    let ordered: Bool
    let minSparseSectors: Int
    let alignmentSectors: Int
    let bufferSize: Int
    let progress: (@Sendable (Double) -> Void)?

    // Iteration state (iterLock).
    private let iterLock = AsyncMutex()
    private var pos: Int64 = 0
    private var sourceIndex = 0
    private var statusEnd: Int64 = 0
    private var status = ConvertChunkStatus.data
    private var nextTicket: Int64 = 0
    private let turnstile = ConvertTurnstile()

    // Shared bookkeeping (stateLock).
    private let stateLock = PosixMutex()
    private var failure: Error?
    private var allocatedTotal: Int64 = 0
    private var allocatedDone: Int64 = 0
    private var lastProgress: Double = 0

    init(sources: [any BlockDriver], lengths: [Int64], target: any BlockDriver, targetHasBacking: Bool, options: ConvertOptions,
         progress: (@Sendable (Double) -> Void)?) throws {
        self.sources = sources
        self.lengths = lengths
        var s: [Int64] = []
        var acc: Int64 = 0
        for l in lengths { s.append(acc); acc += l }
        starts = s
        total = acc
        self.target = target
        qcow2Target = target as? Qcow2Node
        self.options = options
        compress = options.compress
        clusterSize = Int64(qcow2Target?.clusterSize ?? 65536)
        self.targetHasBacking = targetHasBacking
        if targetHasBacking && !options.skipCreate, let b = target.backing {
            targetBackingLength = qemuLength(b)
        } else {
            targetBackingLength = -1
        }
        let zeroInit: Bool
        if let f = (target.file ?? target) as? FileNode { zeroInit = !f.isBlockDevice } else { zeroInit = false }
        hasZeroInit = options.targetIsZero
            || (!options.skipCreate && options.minSparse > 0 && !targetHasBacking && zeroInit)
        // Raw targets need no order for their layout, but progress is reported in order.
        ordered = !options.outOfOrderWrites && (qcow2Target != nil || progress != nil)
        minSparseSectors = Int(options.minSparse / 512)
        var a = 1
        while a * 2 <= max(1, minSparseSectors) { a *= 2 }
        alignmentSectors = a
        bufferSize = compress ? Int(clusterSize) : Convert.bufferSize
        self.progress = progress
        if compress && qcow2Target == nil {
            throw BlockError(.unsupported, "Compression not supported for this file format")
        }
    }

    var failed: Bool { stateLock.withLock { failure != nil } }

    func fail(_ e: Error) {
        stateLock.withLock { if failure == nil { failure = e } }
    }

    func run() async throws {
        if progress != nil {
            // qemu-img counts what will be copied first, for the percentage.
            var n: Int64 = 0
            while let c = try await nextChunk(countingOnly: true) {
                if c.status == .data { n += c.length }
            }
            allocatedTotal = n
            pos = 0; sourceIndex = 0; statusEnd = 0; nextTicket = 0
        }
        let workers = options.parallelRequests
        await withTaskGroup(of: Void.self) { group in
            for _ in 0..<workers {
                group.addTask { await self.worker() }
            }
        }
        if let e = stateLock.withLock({ failure }) { throw e }
    }

    // MARK: Iteration

    /// The next chunk to copy (nil at the end or after a failure).
    private func nextChunk(countingOnly: Bool = false) async throws -> Chunk? {
        await iterLock.lock()
        defer { iterLock.unlock() }
        if pos >= total || (!countingOnly && failed) { return nil }
        while pos >= starts[sourceIndex] + lengths[sourceIndex] { sourceIndex += 1 }
        let srcEnd = starts[sourceIndex] + lengths[sourceIndex]
        if statusEnd <= pos {
            let (st, n): (ConvertChunkStatus, Int64)
            do {
                (st, n) = try await sourceStatus(sourceIndex, pos - starts[sourceIndex], srcEnd - pos)
            } catch {
                throw Self.wrap(error, "error while reading block status at offset \(pos)")
            }
            status = st
            statusEnd = pos + n
        }
        var n = min(statusEnd, srcEnd) - pos
        var st = status
        if compress {
            let clusterEnd = min((pos / clusterSize + 1) * clusterSize, total)
            let want = clusterEnd - pos
            // Compressed clusters are written whole: a shorter run counts as data.
            if n < want { st = .data }
            n = want
        } else if st == .data || (minSparseSectors == 0 && st == .zero) {
            n = min(n, Int64(bufferSize))
            st = .data
        }
        let c = Chunk(offset: pos, length: n, status: st, ticket: nextTicket)
        nextTicket += 1
        pos += n
        return c
    }

    /// The status of source `i` at its offset `local`, for at most `maxLength` bytes.
    private func sourceStatus(_ i: Int, _ local: Int64, _ maxLength: Int64) async throws -> (ConvertChunkStatus, Int64) {
        let src = sources[i]
        let exact = src.length
        if local >= exact { return (.zero, maxLength) }
        let q = min(maxLength, exact - local)
        var st: ConvertChunkStatus
        var n: Int64
        if targetHasBacking {
            let s = try await src.blockStatus(at: local, length: q)
            n = s.length
            if s.flags.contains(.zero) {
                let global = starts[i] + local
                st = targetBackingLength >= 0 && global >= targetBackingLength ? .backing : .zero
            } else if s.flags.contains(.data) {
                st = .data
            } else {
                st = .backing
            }
        } else {
            let e = try await BlockMap.status(of: src, at: local, length: q)
            n = e.length
            st = e.zero ? .zero : .data
        }
        n = max(1, min(n, q))
        // The tail of the last sector belongs to the last run.
        if local + n >= exact { n = maxLength }
        return (st, n)
    }

    // MARK: Copy

    private func worker() async {
        let buffer = AlignedBuffer(count: bufferSize)
        var compressor: Qcow2ClusterCompressor?
        if compress, let q = qcow2Target {
            do { compressor = try q.makeCompressor() } catch { fail(error); return }
        }
        while true {
            let chunk: Chunk
            do {
                guard let c = try await nextChunk() else { return }
                chunk = c
            } catch {
                fail(error)
                return
            }
            var error: Error?
            var compressedLength: Int?
            var allZero = false
            if chunk.status == .data {
                do {
                    try await readSources(chunk.offset, Int(chunk.length), into: buffer)
                    if let compressor {
                        allZero = isZero(buffer.unsafeBase, Int(chunk.length))
                        if !allZero {
                            let cs = Int(clusterSize)
                            if Int(chunk.length) < cs { memset(buffer.unsafeBase + Int(chunk.length), 0, cs - Int(chunk.length)) }
                            compressedLength = compressor.compress(UnsafeRawBufferPointer(start: buffer.unsafeBase, count: cs))
                        }
                    }
                } catch let e {
                    error = Self.wrap(e, "error while reading at byte \(chunk.offset)")
                }
            }
            if ordered { await turnstile.wait(for: chunk.ticket) }
            if error == nil && !failed {
                do {
                    try await write(chunk, buffer, compressor: compressor, compressedLength: compressedLength, allZero: allZero)
                } catch let e {
                    error = Self.wrap(e, "error while writing at byte \((e as? BlockError)?.offset ?? chunk.offset)")
                }
            }
            if error == nil && chunk.status == .data { reportProgress(chunk.length) }
            if ordered { turnstile.done(chunk.ticket) }
            if let error {
                fail(error)
                return
            }
        }
    }

    /// qemu-img's wording for a failed request: "<what>: <strerror>".
    static func wrap(_ error: Error, _ what: String) -> BlockError {
        let e = error.asBlockError
        let reason = e.errno.map { BlockError.strerror($0) } ?? e.message
        return BlockError(e.code, "\(what): \(reason)", errno: e.errno, path: e.path, offset: e.offset,
                          operation: e.operation, underlying: e)
    }

    private func reportProgress(_ n: Int64) {
        guard let progress else { return }
        let value: Double? = stateLock.withLock {
            allocatedDone += n
            let p = allocatedTotal > 0 ? min(100, 100.0 * Double(allocatedDone) / Double(allocatedTotal)) : 100
            // qemu-img prints when the value moved by more than 1% (min_skip).
            if p > lastProgress + 1 || p == 100 {
                lastProgress = p
                return p
            }
            return nil
        }
        if let value { progress(value) }
    }

    /// Reads guest bytes [offset, offset+count) of the concatenated sources.
    private func readSources(_ offset: Int64, _ count: Int, into buffer: AlignedBuffer) async throws {
        var done = 0
        let base = buffer.unsafeBase
        var i = 0
        while done < count {
            let p = offset + Int64(done)
            while p >= starts[i] + lengths[i] { i += 1 }
            let local = p - starts[i]
            let n = Int(min(Int64(count - done), starts[i] + lengths[i] - p))
            let src = sources[i]
            let readable = Int(max(0, min(Int64(n), src.length - local)))
            if readable > 0 {
                try await src.read(at: local, into: UnsafeMutableRawBufferPointer(start: base + done, count: readable))
            }
            if readable < n { memset(base + done + readable, 0, n - readable) }
            done += n
        }
    }

    private func write(_ chunk: Chunk, _ buffer: AlignedBuffer, compressor: Qcow2ClusterCompressor?,
                       compressedLength: Int?, allZero: Bool) async throws {
        switch chunk.status {
        case .backing:
            return
        case .zero:
            try await writeZeroes(chunk.offset, chunk.length)
        case .data:
            let base = buffer.unsafeBase
            if let compressor, let q = qcow2Target {
                if allZero {
                    try await writeZeroes(chunk.offset, chunk.length)
                    return
                }
                let data = UnsafeRawBufferPointer(start: base, count: Int(chunk.length))
                let compressed = compressedLength.map { UnsafeRawBufferPointer(start: compressor.output.unsafeBase, count: $0) }
                try await q.writePrecompressedCluster(at: chunk.offset, data: data, compressed: compressed)
                return
            }
            if minSparseSectors == 0 {
                try await target.write(at: chunk.offset, from: UnsafeRawBufferPointer(start: base, count: Int(chunk.length)), flags: [])
                return
            }
            // Split into data and zero runs (whole sectors; a short last sector is data).
            let count = Int(chunk.length)
            var done = 0
            while done < count {
                let sectors = (count - done + 511) / 512
                let (isData, runSectors) = allocatedSectorsMin(base + done, sectors,
                                                               sectorNumber: (chunk.offset + Int64(done)) / 512)
                let n = min(runSectors * 512, count - done)
                if isData {
                    try await target.write(at: chunk.offset + Int64(done),
                                           from: UnsafeRawBufferPointer(start: base + done, count: n), flags: [])
                } else {
                    try await writeZeroes(chunk.offset + Int64(done), Int64(n))
                }
                done += n
            }
        }
    }

    private func writeZeroes(_ offset: Int64, _ length: Int64) async throws {
        if hasZeroInit { return }
        try await target.writeZeroes(at: offset, length: length, flags: [.mayUnmap])
    }

    // MARK: Zero detection (qemu-img's is_allocated_sectors and is_allocated_sectors_min)

    private func sectorIsZero(_ p: UnsafeRawPointer, _ bytes: Int = 512) -> Bool {
        isZero(p, bytes)
    }

    /// The first run of `n` sectors at `p`: whether it is data, and its length in sectors.
    private func allocatedSectors(_ p: UnsafeRawPointer, _ n: Int, sectorNumber: Int64) -> (Bool, Int) {
        if n <= 0 { return (false, 0) }
        var zero = sectorIsZero(p)
        var i = 1
        while i < n {
            if zero != sectorIsZero(p + i * 512) { break }
            i += 1
        }
        if i == n { return (!zero, i) }
        let tail = Int((sectorNumber + Int64(i)) & Int64(alignmentSectors - 1))
        if tail != 0 {
            // A zero run that is only a short tail counts as data; data ends aligned up,
            // zeros aligned down.
            if zero && i <= tail { zero = false }
            if !zero {
                i = min(i + alignmentSectors - tail, n)
            } else {
                i -= tail
            }
        }
        return (!zero, i)
    }

    private func allocatedSectorsMin(_ p: UnsafeRawPointer, _ count: Int, sectorNumber: Int64) -> (Bool, Int) {
        let minRun = min(minSparseSectors, count)
        var (isData, num) = allocatedSectors(p, count, sectorNumber: sectorNumber)
        if !isData { return (false, num) }
        var used = num
        var checked = num
        var n = count - num
        var q = p + num * 512
        var sector = sectorNumber + Int64(num)
        while n > 0 {
            (isData, num) = allocatedSectors(q, n, sectorNumber: sector)
            q += num * 512
            n -= num
            sector += Int64(num)
            checked += num
            if isData {
                used = checked
            } else if num >= minRun {
                break
            }
        }
        return (true, used)
    }
}

/// Whether `count` bytes at `p` are all zero.
@inline(__always)
func isZero(_ p: UnsafeRawPointer, _ count: Int) -> Bool {
    var i = 0
    // Word-wise, eight words at a time: stops at the first non-zero word.
    while i + 64 <= count {
        let a = p.loadUnaligned(fromByteOffset: i, as: UInt64.self) | p.loadUnaligned(fromByteOffset: i + 8, as: UInt64.self)
            | p.loadUnaligned(fromByteOffset: i + 16, as: UInt64.self) | p.loadUnaligned(fromByteOffset: i + 24, as: UInt64.self)
        let b = p.loadUnaligned(fromByteOffset: i + 32, as: UInt64.self) | p.loadUnaligned(fromByteOffset: i + 40, as: UInt64.self)
            | p.loadUnaligned(fromByteOffset: i + 48, as: UInt64.self) | p.loadUnaligned(fromByteOffset: i + 56, as: UInt64.self)
        if a | b != 0 { return false }
        i += 64
    }
    while i < count {
        if p.load(fromByteOffset: i, as: UInt8.self) != 0 { return false }
        i += 1
    }
    return true
}
