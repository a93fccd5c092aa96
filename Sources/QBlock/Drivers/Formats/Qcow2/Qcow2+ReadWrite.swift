#if canImport(Glibc)
import Glibc
#endif
import QBlockCore
import QBlockGraph

/// The qcow2 data path: reads, allocating writes with copy-on-write of partial clusters
/// and block status (zero writes and discards: Qcow2+Zeroes.swift).
extension Qcow2Node {
    // MARK: Read

    /// Reads `buffer.count` bytes at guest `offset`: allocated clusters from the file
    /// (decompressing compressed ones), unallocated ones from the backing node or as zeroes.
    /// - Throws: ``BlockError`` `.closed` after ``close()``, `.outOfRange` for a range past the end, or an I/O error.
    public func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws {
        try gate.enter(filename, "read")
        defer { gate.leave() }
        try checkRange(offset, Int64(buffer.count), "read")
        try await readRuns(at: offset, into: buffer)
    }

    /// Reads `buffer.count` bytes at `offset` (guest disk or VM state area: both are the
    /// same L1/L2 address space), a mapped run at a time. Range already checked.
    func readRuns(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws {
        var done = 0
        while done < buffer.count {
            let pos = offset + Int64(done)
            await metaLock.lock()
            let m: Mapping
            do {
                m = try await lookup(pos, Int64(buffer.count - done))
            } catch {
                metaLock.unlock()
                throw error
            }
            metaLock.unlock()
            let n = Int(m.length)
            let part = UnsafeMutableRawBufferPointer(rebasing: buffer[done..<(done + n)])
            try await readMapped(m, guestOffset: pos, into: part)
            done += n
        }
    }

    /// Reads the bytes of one mapping run.
    func readMapped(_ m: Mapping, guestOffset: Int64, into part: UnsafeMutableRawBufferPointer) async throws {
        switch m.kind {
        case .normal:
            await hostFile.debugEvent(.readAio)
            try await hostFile.read(at: m.hostOffset, into: part)
        case .zero, .zeroAllocated:
            memset(part.baseAddress!, 0, part.count)
        case .unallocated:
            try await readBacking(at: guestOffset, into: part)
        case .compressed:
            try await readCompressed(entry: m.entry, guestOffset: guestOffset, into: part)
        }
    }

    /// Reads from the backing file; zeros where there is none or beyond its end.
    func readBacking(at offset: Int64, into part: UnsafeMutableRawBufferPointer) async throws {
        guard let b = backingNode else {
            memset(part.baseAddress!, 0, part.count)
            return
        }
        await hostFile.debugEvent(.readBackingAio)
        let blen = b.length
        let avail = max(0, min(Int64(part.count), blen - offset))
        if avail > 0 {
            try await b.read(at: offset, into: UnsafeMutableRawBufferPointer(rebasing: part[0..<Int(avail)]))
        }
        if Int(avail) < part.count {
            memset(part.baseAddress! + Int(avail), 0, part.count - Int(avail))
        }
    }

    // MARK: Write

    /// Writes `buffer` at guest `offset`, allocating clusters (copy-on-write of partial
    /// clusters from the backing node) and marking the image's bitmaps.
    /// - Throws: ``BlockError`` `.closed` after ``close()``, `.readOnly`, `.outOfRange` for a range past the end, `.noSpace` or an I/O error.
    public func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags) async throws {
        try await write(at: offset, from: buffer, flags: flags, placed: nil)
    }

    /// Writes like ``write(at:from:flags:)``, and calls `placed` as soon as every cluster the
    /// request needs has its host offset (allocated or found), before the last data write:
    /// a caller that orders its requests for the image's layout (convert's in-order writes)
    /// can let the next request allocate while this one's data is still being written.
    /// `placed` is not called when the request fails before that point.
    public func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags,
               placed: (() -> Void)?) async throws {
        try gate.enter(filename, "write")
        defer { gate.leave() }
        try await writeAdmitted(at: offset, from: buffer, flags: writeThrough.value ? flags.union(.fua) : flags, placed: placed)
    }

    /// ``write(at:from:flags:placed:)`` for a request the gate already admitted (the write
    /// paths of write-zeroes and compressed writes): it must not enter the gate again, or a
    /// close beginning meanwhile would refuse the rest of a request that has partly landed.
    func writeAdmitted(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags,
                       placed: (() -> Void)?) async throws {
        try checkWritable("write")
        try checkRange(offset, Int64(buffer.count), "write")
        defer { markBitmaps(offset, Int64(buffer.count)) }
        var done = 0
        while done < buffer.count {
            let n = try await writeRun(at: offset + Int64(done),
                                       from: UnsafeRawBufferPointer(rebasing: buffer[done...]), flags: flags,
                                       placed: placed)
            done += n
        }
        if flags.contains(.fua) { try await flushAdmitted(lazyRefcounts: true) }
    }

    /// Requests must lie within the virtual size (the L1 table covers nothing beyond it).
    @inline(__always)
    func checkRange(_ offset: Int64, _ length: Int64, _ op: String) throws {
        if offset < 0 || length < 0 || offset > Int64(header.size) - length {
            throw BlockError(.outOfRange, "Request of \(length) bytes at offset \(offset) is beyond the end of the image (\(header.size) bytes)",
                             errno: EINVAL, path: filename, offset: offset, operation: op)
        }
    }

    func checkWritable(_ op: String) throws {
        if isReadOnly {
            throw BlockError(.readOnly, "Permission denied: image is read-only", errno: EPERM, path: filename, operation: op)
        }
    }

    private enum WritePlan {
        /// Overwrite `length` bytes in place at `host`.
        case inPlace(host: Int64, length: Int)
        /// New clusters were allocated for the run; data must be written, then L2 updated.
        case allocated(Allocation)

        /// The bytes of the request the plan covers.
        var length: Int {
            switch self {
            case .inPlace(_, let n): return n
            case .allocated(let a): return a.runBytes
            }
        }
    }

    private struct Allocation {
        let l1Index: Int
        let firstL2: Int
        let host: Int64
        let oldEntries: [UInt64]
        let guestStart: Int64
        let runBytes: Int
        let event: AsyncEvent
        /// The host clusters are the zero clusters' own (kept allocated, refcount one), written
        /// in place: nothing to free after the L2 update, nothing to give back on failure.
        var reused = false
    }

    /// Writes the first run of `buffer` that needs the same treatment; returns its length.
    func writeRun(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags,
                  placed: (() -> Void)?) async throws -> Int {
        let cbits = Int64(clusterBits)
        let firstCluster = offset >> cbits
        let lastCluster = (offset + Int64(buffer.count) - 1) >> cbits
        while true {
            await metaLock.lock()
            guard await waitForInflight(firstCluster, lastCluster - firstCluster + 1) else { continue }
            let plan: WritePlan
            do {
                plan = try await planWrite(offset: offset, count: buffer.count)
            } catch {
                metaLock.unlock()
                throw error
            }
            metaLock.unlock()
            if let placed, plan.length == buffer.count { placed() }
            switch plan {
            case .inPlace(let host, let n):
                await hostFile.debugEvent(.writeAio)
                try await hostFile.write(at: host, from: UnsafeRawBufferPointer(rebasing: buffer[0..<n]), flags: [])
                return n
            case .allocated(let a):
                let data = UnsafeRawBufferPointer(rebasing: buffer[0..<a.runBytes])
                var failure: Error?
                do {
                    try await writeAllocated(host: a.host, guestStart: a.guestStart,
                                             clusters: Int64(a.oldEntries.count), oldEntries: a.oldEntries,
                                             offset: offset, data: data)
                } catch {
                    failure = error
                }
                await metaLock.lock()
                defer {
                    inflight.removeAll { $0.done === a.event }
                    metaLock.unlock()
                    a.event.signal()
                }
                let clusters = Int64(a.oldEntries.count)
                if let failure {
                    // The data never became reachable: give the clusters back (QEMU's
                    // qcow2_alloc_cluster_abort), without waiting for any other write.
                    if !a.reused { await releaseUnreferenced(a.host >> cbits, clusters) }
                    throw failure
                }
                do {
                    try await commitAllocation(a)
                } catch {
                    if !a.reused { await releaseUnreferenced(a.host >> cbits, clusters) }
                    throw error
                }
                if !a.reused { try await freeReplaced(a.oldEntries) }
                return a.runBytes
            }
        }
    }

    /// Decides how to write the run at `offset`, allocating clusters if needed. Lock held.
    private func planWrite(offset: Int64, count: Int) async throws -> WritePlan {
        let cs = Int64(clusterSize)
        let cbits = Int64(clusterBits)
        let m = try await lookup(offset, Int64(count))
        let firstCluster = offset >> cbits
        let lastCluster = (offset + Int64(count) - 1) >> cbits
        let l1Index = Int(firstCluster / Int64(l2Entries))
        let firstL2 = Int(firstCluster % Int64(l2Entries))
        if m.kind == .normal && m.copied {
            return .inPlace(host: m.hostOffset, length: Int(m.length))
        }
        if m.kind == .zeroAllocated && m.copied {
            // As QEMU (cluster_needs_new_alloc, handle_copied): zero clusters that keep their
            // own host cluster, contiguous in the file, are written where they are; the parts
            // the request does not cover are zeroed. The run holds zero clusters only: a data
            // cluster in it would be read and written back around the request (or zeroed
            // before the data lands), racing with its own in-place writers and readers; it
            // is written in place by the next run instead.
            let inCluster = offset & (cs - 1)
            let base = m.hostOffset - inCluster
            let t = try await l2Cache.get(try await l2Offset(l1Index))
            let maxClusters = min(lastCluster - firstCluster + 1, Int64(l2Entries - firstL2))
            var n: Int64 = 0
            while n < maxClusters {
                let e = t.bytes.be64((firstL2 + Int(n)) * 8)
                guard kind(of: e) == .zeroAllocated, e & Qcow2Node.copied != 0,
                      Int64(e & Qcow2Node.l2OffsetMask) == base + n * cs else { break }
                n += 1
            }
            let table = try await l2TableForWrite(l1Index)
            let oldEntries = (0..<Int(n)).map { table.bytes.be64((firstL2 + $0) * 8) }
            let guestStart = firstCluster << cbits
            let event = AsyncEvent()
            inflight.append(InflightAllocation(firstCluster: firstCluster, count: n, done: event))
            return .allocated(Allocation(l1Index: l1Index, firstL2: firstL2, host: base,
                                         oldEntries: oldEntries, guestStart: guestStart,
                                         runBytes: Int(min(Int64(count), guestStart + n * cs - offset)),
                                         event: event, reused: true))
        }
        let table = try await l2TableForWrite(l1Index)
        let maxClusters = min(lastCluster - firstCluster + 1, Int64(l2Entries - firstL2))
        var oldEntries: [UInt64] = []
        for i in 0..<Int(maxClusters) {
            let e = table.bytes.be64((firstL2 + i) * 8)
            if kind(of: e) == .normal || kind(of: e) == .zeroAllocated, e & Qcow2Node.copied != 0 { break }
            oldEntries.append(e)
        }
        let n = Int64(oldEntries.count)
        let host = try await allocateClusters(n)
        let guestStart = firstCluster << cbits
        let runBytes = Int(min(Int64(count), guestStart + n * cs - offset))
        let event = AsyncEvent()
        inflight.append(InflightAllocation(firstCluster: firstCluster, count: n, done: event))
        return .allocated(Allocation(l1Index: l1Index, firstL2: firstL2, host: host,
                                     oldEntries: oldEntries, guestStart: guestStart, runBytes: runBytes, event: event))
    }

    /// Points the L2 entries at the newly written clusters. Lock held. When it throws, no
    /// entry was changed.
    private func commitAllocation(_ a: Allocation) async throws {
        let cs = Int64(clusterSize)
        let t = try await l2TableForWrite(a.l1Index)
        l2Cache.pin(t)
        defer { l2Cache.release(t) }
        // Set the dependency before touching the entries: setting it may write the L2 cache
        // (when the refcount cache depended on it), and the new references must not reach
        // the disk before the counts of the clusters they point to — unless the image is
        // marked dirty (lazy refcounts): then the next open rebuilds the counts anyway, and
        // QEMU lets the references go first (`qcow2_need_accurate_refcounts`).
        if !isDirty { try await l2Cache.setDependency(on: refcountCache) }
        for i in 0..<a.oldEntries.count {
            t.bytes.setBE64((a.firstL2 + i) * 8, UInt64(a.host + Int64(i) * cs) | Qcow2Node.copied)
        }
        l2Cache.markDirty(t)
    }

    /// Drops the references the L2 entries `oldEntries` held before an allocating write
    /// replaced them. Lock held.
    private func freeReplaced(_ oldEntries: [UInt64]) async throws {
        for e in oldEntries {
            switch kind(of: e) {
            case .normal, .zeroAllocated:
                try await freeClusters(at: Int64(e & Qcow2Node.l2OffsetMask), count: 1)
            case .compressed:
                try await freeCompressed(entry: e)
            default: break
            }
        }
    }

    /// Writes guest data into newly allocated host clusters, filling the parts of the first
    /// and last cluster the request does not cover from their previous content (copy-on-write).
    private func writeAllocated(host: Int64, guestStart: Int64, clusters: Int64,
                                oldEntries: [UInt64], offset: Int64, data: UnsafeRawBufferPointer) async throws {
        let cs = Int64(clusterSize)
        let total = clusters * cs
        let head = Int(offset - guestStart)
        let tail = Int(total) - head - data.count
        if head == 0 && tail == 0 {
            await hostFile.debugEvent(.writeAio)
            try await hostFile.write(at: host, from: data, flags: [])
            return
        }
        // Where the previous content is all zeros, no data needs reading or copying.
        let headZero = head == 0 || oldReadsZero(oldEntries[0], guestStart)
        let tailZero = tail == 0 || oldReadsZero(oldEntries[oldEntries.count - 1], guestStart + total - cs)
        if headZero && tailZero {
            // Zero the clusters efficiently, then write the data (as QEMU does for zero
            // copy-on-write areas, so the host file is laid out the same).
            await hostFile.debugEvent(.clusterAllocSpace)
            try await hostFile.writeZeroes(at: host, length: total, flags: [])
            await hostFile.debugEvent(.writeAio)
            try await hostFile.write(at: host + Int64(head), from: data, flags: [])
            return
        }
        let buf = AlignedBuffer(count: Int(total))
        // SAFETY: `buf` has `total` bytes = head + data + tail; every rebased slice below lies in
        // `0..<total`, and the async closure keeps `buf` alive.
        try await buf.withUnsafeMutableBytes { b in
            await hostFile.debugEvent(.cowRead)
            if head > 0 && !headZero {
                try await readOld(oldEntries[0], guestOffset: guestStart,
                                  into: UnsafeMutableRawBufferPointer(rebasing: b[0..<head]))
            }
            if tail > 0 && !tailZero {
                let lastStart = Int(total - cs)
                let tailStart = head + data.count
                // Read the whole last cluster's old content, then keep its tail.
                let from = max(lastStart, tailStart)
                try await readOld(oldEntries[oldEntries.count - 1], guestOffset: guestStart + Int64(from),
                                  into: UnsafeMutableRawBufferPointer(rebasing: b[from..<Int(total)]))
            }
            UnsafeMutableRawBufferPointer(rebasing: b[head..<(head + data.count)]).copyMemory(from: data)
            await hostFile.debugEvent(.writeAio)
            await hostFile.debugEvent(.cowWrite)
            try await hostFile.write(at: host, from: UnsafeRawBufferPointer(b), flags: [])
        }
    }

    /// Whether the old content of the cluster with L2 entry `e` at guest `offset` reads as zeros
    /// without looking at data.
    private func oldReadsZero(_ e: UInt64, _ guestOffset: Int64) -> Bool {
        switch kind(of: e) {
        case .zero, .zeroAllocated: return true
        case .unallocated: return backingNode == nil || guestOffset >= backingNode!.length
        default: return false
        }
    }

    /// Reads the previous content of a cluster (given its old L2 entry) for copy-on-write.
    private func readOld(_ e: UInt64, guestOffset: Int64, into part: UnsafeMutableRawBufferPointer) async throws {
        let cs = Int64(clusterSize)
        let k = kind(of: e)
        let m = Mapping(kind: k, hostOffset: Int64(e & Qcow2Node.l2OffsetMask) + (guestOffset & (cs - 1)),
                        length: Int64(part.count), entry: e, copied: false)
        try await readMapped(m, guestOffset: guestOffset, into: part)
    }

    // MARK: Block status

    /// The allocation status of the run of clusters at guest `offset` with the same state (up
    /// to `length` bytes): data, zero, unallocated (backing), or compressed, with the host
    /// offset where there is one (`qemu-img map`).
    /// - Throws: ``BlockError`` `.closed` after ``close()``, `.outOfRange` for an offset past the end, or an I/O error.
    public func blockStatus(at offset: Int64, length: Int64) async throws -> BlockStatus {
        try gate.enter(filename, "block status")
        defer { gate.leave() }
        try checkRange(offset, max(length, 1), "block status")
        await metaLock.lock()
        let m: Mapping
        do { m = try await lookup(offset, length) } catch { metaLock.unlock(); throw error }
        metaLock.unlock()
        return status(of: m, at: offset)
    }

    /// The block status of a mapping run starting at guest `offset` (shared with snapshot views).
    func status(of m: Mapping, at offset: Int64) -> BlockStatus {
        switch m.kind {
        case .unallocated:
            // Not allocated here: zeros unless a backing file covers the offset; a run stops
            // where the backing file ends.
            if let b = backingNode, offset < b.length {
                return BlockStatus(flags: [], length: min(m.length, b.length - offset))
            }
            return BlockStatus(flags: [.zero], length: m.length)
        case .zero:
            return BlockStatus(flags: [.zero, .allocated], length: m.length)
        case .zeroAllocated:
            return BlockStatus(flags: [.zero, .allocated], length: m.length, hostOffset: m.hostOffset)
        case .normal:
            return BlockStatus(flags: [.data, .allocated], length: m.length, hostOffset: m.hostOffset)
        case .compressed:
            return BlockStatus(flags: [.data, .allocated, .compressed], length: m.length)
        }
    }
}
