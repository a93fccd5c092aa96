#if canImport(Glibc)
import Glibc
#endif
import CSupport
import QBlockCore
import QBlockDrivers
import QBlockGraph

// The copy engine of `Convert`: chunk iteration, the workers, in-order write turns.

/// What a run of the source is, for the copy (qemu-img's `ImgConvertBlockStatus`).
enum ConvertChunkStatus {
    case data, zero, backing
}

/// Hands write turns out in ticket order (qemu-img's in-order writes without `-W`).
// @unchecked: `current` and `waiters` are only touched with `lock` held.
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
// @unchecked: the iteration state (`pos`, `sourceIndex`, `statusEnd`, `status`, `nextTicket`) is only
// touched with the AsyncMutex `iterLock` held; failure and progress state with `stateLock` held; the
// lets are immutable.
final class ConvertJob: @unchecked Sendable {
    struct Chunk {
        var offset: Int64
        var length: Int64
        var status: ConvertChunkStatus
        var ticket: Int64
        /// What `--salvage` could not query while this chunk was made (reported in chunk order).
        var warnings: [String] = []
    }

    let sources: [any BlockDriver]
    let starts: [Int64]
    let lengths: [Int64]
    let total: Int64
    let target: any BlockDriver
    /// The target's compressed writes, when it has them (used with `-c`).
    let compressingTarget: (any CompressedWriting)?
    /// The target's ordered allocation, when its layout depends on the order of writes.
    let allocatingTarget: (any AllocatingFormat)?
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
    /// Chunks finished ahead of an earlier one (ticket → data bytes), and the next ticket to count.
    private var finishedChunks: [Int64: Int64] = [:]
    private var nextProgressTicket: Int64 = 0
    /// `--salvage` warnings of chunks finished ahead of an earlier one, and the next ticket to report.
    private var pendingWarnings: [Int64: [String]] = [:]
    private var nextWarningTicket: Int64 = 0

    /// - Parameter targetZeroInit: the new target reads as zeros where nothing is written
    ///   (``Convert/hasZeroInit(_:)``).
    init(sources: [any BlockDriver], lengths: [Int64], target: any BlockDriver, targetHasBacking: Bool, targetZeroInit: Bool,
         options: ConvertOptions, progress: (@Sendable (Double) -> Void)?) throws {
        self.sources = sources
        self.lengths = lengths
        var s: [Int64] = []
        var acc: Int64 = 0
        for l in lengths { s.append(acc); acc += l }
        starts = s
        total = acc
        self.target = target
        compressingTarget = target as? any CompressedWriting
        allocatingTarget = target as? any AllocatingFormat
        self.options = options
        compress = options.compress
        clusterSize = Int64((target as? any ClusteredFormat)?.clusterSize ?? 65536)
        self.targetHasBacking = targetHasBacking
        if targetHasBacking && !options.skipCreate, let b = target.backing {
            targetBackingLength = qemuLength(b)
        } else {
            targetBackingLength = -1
        }
        hasZeroInit = options.targetIsZero
            || (!options.skipCreate && options.minSparse > 0 && !targetHasBacking && targetZeroInit)
        // Raw targets need no order for their layout, but progress is reported in order.
        ordered = !options.outOfOrderWrites && (allocatingTarget != nil || progress != nil)
        minSparseSectors = Int(options.minSparse / 512)
        var a = 1
        while a * 2 <= max(1, minSparseSectors) { a *= 2 }
        alignmentSectors = a
        bufferSize = compress ? Int(clusterSize) : Convert.bufferSize
        self.progress = progress
        if compress && compressingTarget == nil {
            throw BlockError(.unsupported, "Compression not supported for this file format")
        }
    }

    var failed: Bool { stateLock.withLock { failure != nil } }

    func fail(_ e: Error) {
        stateLock.withLock { if failure == nil { failure = e } }
    }

    func run() async throws {
        if progress != nil || options.salvage {
            // qemu-img counts what will be copied first, for the percentage (and reports the
            // block status errors it salvages in this pass too).
            var n: Int64 = 0
            while let c = try await nextChunk(countingOnly: true) {
                if c.status == .data { n += c.length }
                for w in c.warnings { warn(w) }
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
        var warnings: [String] = []
        if statusEnd <= pos {
            let (st, n): (ConvertChunkStatus, Int64)
            let local = pos - starts[sourceIndex]
            do {
                (st, n) = try await sourceStatus(sourceIndex, local, srcEnd - pos)
            } catch where options.salvage {
                // Retry on a quarter of the range until one sector fails: read that one as data.
                var sectors = (srcEnd - pos + 511) / 512
                var lastError = error
                var result: (ConvertChunkStatus, Int64)?
                while result == nil {
                    if sectors <= 1 {
                        warnings.append(Self.wrap(lastError, "error while reading block status at offset \(local)").message)
                        result = (.data, min(512, srcEnd - pos))
                    } else {
                        sectors = (sectors + 3) / 4
                        do {
                            result = try await sourceStatus(sourceIndex, local, min(sectors * 512, srcEnd - pos))
                        } catch {
                            lastError = error
                        }
                    }
                }
                (st, n) = result ?? (.data, min(512, srcEnd - pos))
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
            // Compressed clusters are written whole: a shorter run counts as data; with
            // `-S 0` zeros are data too (written as compressed clusters, as qemu-img).
            if n < want || (minSparseSectors == 0 && st == .zero) { st = .data }
            n = want
        } else if st == .data || (minSparseSectors == 0 && st == .zero) {
            n = min(n, Int64(bufferSize))
            st = .data
        }
        let c = Chunk(offset: pos, length: n, status: st, ticket: nextTicket, warnings: warnings)
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
        let buffer = AlignedBuffer(count: bufferSize, hugePages: true)
        var compressor: (any ClusterCompressor)?
        if compress, let q = compressingTarget {
            do { compressor = try q.makeClusterCompressor() } catch { fail(error); return }
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
            var warnings = chunk.warnings
            if chunk.status == .data {
                do {
                    try await readSources(chunk.offset, Int(chunk.length), into: buffer, warnings: &warnings)
                    if let compressor {
                        // (`-S 0` keeps even zero clusters: they are compressed too.)
                        allZero = minSparseSectors > 0 && isZero(buffer.unsafeBase, Int(chunk.length))
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
            if options.salvage { reportWarnings(warnings, ticket: chunk.ticket) }
            // The turn orders the allocations (the layout is qemu-img's); a chunk whose last
            // request is an allocating data write hands the turn on once its clusters are placed,
            // so that the next chunk's write is queued while this one's data is copied.
            var turnHeld = ordered
            if ordered { await turnstile.wait(for: chunk.ticket) }
            let endTurn = {
                if turnHeld {
                    turnHeld = false
                    self.turnstile.done(chunk.ticket)
                }
            }
            if error == nil && !failed {
                do {
                    try await write(chunk, buffer, compressor: compressor, compressedLength: compressedLength,
                                    allZero: allZero, placed: endTurn)
                } catch let e {
                    error = Self.wrap(e, "error while writing at byte \((e as? BlockError)?.offset ?? chunk.offset)")
                }
            }
            if error == nil { reportProgress(chunk.status == .data ? chunk.length : 0, ticket: chunk.ticket) }
            endTurn()
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

    /// Counts a finished chunk's data towards the progress, in chunk order: chunks finish out
    /// of order (a chunk hands its write turn on before its data is copied), and the values
    /// printed must not depend on that — nor go backwards (a 66.67% line after 100% was seen
    /// under load).
    private func reportProgress(_ n: Int64, ticket: Int64) {
        guard let progress else { return }
        stateLock.withLock {
            finishedChunks[ticket] = n
            while let done = finishedChunks.removeValue(forKey: nextProgressTicket) {
                nextProgressTicket += 1
                guard done > 0 else { continue }
                allocatedDone += done
                let p = allocatedTotal > 0 ? min(100, 100.0 * Double(allocatedDone) / Double(allocatedTotal)) : 100
                // qemu-img prints when the value moved by more than 1% (min_skip).
                if p > lastProgress + 1 || p == 100 {
                    lastProgress = p
                    progress(p)
                }
            }
        }
    }

    /// Prints a `--salvage` warning (unless quiet).
    private func warn(_ message: String) {
        if !options.quiet { options.warning?(message) }
    }

    /// Prints the `--salvage` warnings of chunk `ticket` in chunk order (qemu-img's, whose
    /// reads are handed out and reported in guest order).
    private func reportWarnings(_ warnings: [String], ticket: Int64) {
        stateLock.withLock {
            pendingWarnings[ticket] = warnings
            while let ws = pendingWarnings.removeValue(forKey: nextWarningTicket) {
                nextWarningTicket += 1
                for w in ws { warn(w) }
            }
        }
    }

    /// Reads guest bytes [offset, offset+count) of the concatenated sources. With
    /// `--salvage`, a failing read is retried sector by sector and each sector that fails
    /// reads as zeros, with a warning appended to `warnings`.
    private func readSources(_ offset: Int64, _ count: Int, into buffer: AlignedBuffer, warnings: inout [String]) async throws {
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
                do {
                    try await src.read(at: local, into: UnsafeMutableRawBufferPointer(start: base + done, count: readable))
                } catch where options.salvage {
                    var k = 0
                    while k < readable {
                        let m = min(512, readable - k)
                        let piece = UnsafeMutableRawBufferPointer(start: base + done + k, count: m)
                        do {
                            try await src.read(at: local + Int64(k), into: piece)
                        } catch {
                            warnings.append(Self.wrap(error, "error while reading offset \(local + Int64(k))").message)
                            memset(base + done + k, 0, m)
                        }
                        k += m
                    }
                }
            }
            if readable < n { memset(base + done + readable, 0, n - readable) }
            done += n
        }
    }

    /// Writes one chunk. `placed` is called once the last request of the chunk has its
    /// clusters (``AllocatingFormat`` targets only); the caller ends the turn itself otherwise.
    private func write(_ chunk: Chunk, _ buffer: AlignedBuffer, compressor: (any ClusterCompressor)?,
                       compressedLength: Int?, allZero: Bool, placed: @escaping () -> Void) async throws {
        switch chunk.status {
        case .backing:
            return
        case .zero:
            try await writeZeroes(chunk.offset, chunk.length)
        case .data:
            let base = buffer.unsafeBase
            if let compressor, let q = compressingTarget {
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
                try await writeData(chunk.offset, UnsafeRawBufferPointer(start: base, count: Int(chunk.length)), placed: placed)
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
                    let last = done + n == count
                    try await writeData(chunk.offset + Int64(done), UnsafeRawBufferPointer(start: base + done, count: n),
                                        placed: last ? placed : nil)
                } else {
                    try await writeZeroes(chunk.offset + Int64(done), Int64(n))
                }
                done += n
            }
        }
    }

    private func writeData(_ offset: Int64, _ data: UnsafeRawBufferPointer, placed: (() -> Void)?) async throws {
        if let q = allocatingTarget, let placed {
            try await q.write(at: offset, from: data, flags: [], placed: placed)
        } else {
            try await target.write(at: offset, from: data, flags: [])
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
