#if canImport(Glibc)
import Glibc
#endif

/// The qcow2 data path: reads, allocating writes with copy-on-write of partial clusters,
/// write-zeroes, discard and block status.
extension Qcow2Node {
    // MARK: Read

    public func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws {
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

    public func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags) async throws {
        try checkWritable("write")
        var done = 0
        while done < buffer.count {
            let n = try await writeRun(at: offset + Int64(done),
                                       from: UnsafeRawBufferPointer(rebasing: buffer[done...]), flags: flags)
            done += n
        }
        if flags.contains(.fua) { try await flush() }
    }

    func checkWritable(_ op: String) throws {
        if isReadOnly {
            throw BlockError(.readOnly, "Permission denied: image is read-only", errno: EPERM, path: filename, operation: op)
        }
        if closed { throw BlockError(.closed, "Image is closed", path: filename, operation: op) }
    }

    private enum WritePlan {
        /// Overwrite `length` bytes in place at `host`.
        case inPlace(host: Int64, length: Int)
        /// New clusters were allocated for the run; data must be written, then L2 updated.
        case allocated(Allocation)
    }

    private struct Allocation {
        let l1Index: Int
        let firstL2: Int
        let host: Int64
        let oldEntries: [UInt64]
        let guestStart: Int64
        let runBytes: Int
        let event: AsyncEvent
    }

    /// Writes the first run of `buffer` that needs the same treatment; returns its length.
    private func writeRun(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags) async throws -> Int {
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
            switch plan {
            case .inPlace(let host, let n):
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
                if let failure {
                    // The data never became reachable: give the clusters back.
                    try? await freeClusters(at: a.host, count: Int64(a.oldEntries.count))
                    throw failure
                }
                try await commitAllocation(a)
                return a.runBytes
            }
        }
    }

    /// Decides how to write the run at `offset`, allocating clusters if needed. Lock held.
    private func planWrite(offset: Int64, count: Int) async throws -> WritePlan {
        let cs = Int64(clusterSize)
        let cbits = Int64(clusterBits)
        let m = try await lookup(offset, Int64(count))
        if m.kind == .normal && m.copied {
            return .inPlace(host: m.hostOffset, length: Int(m.length))
        }
        let firstCluster = offset >> cbits
        let lastCluster = (offset + Int64(count) - 1) >> cbits
        let l1Index = Int(firstCluster / Int64(l2Entries))
        let table = try await l2TableForWrite(l1Index)
        let firstL2 = Int(firstCluster % Int64(l2Entries))
        let maxClusters = min(lastCluster - firstCluster + 1, Int64(l2Entries - firstL2))
        var oldEntries: [UInt64] = []
        for i in 0..<Int(maxClusters) {
            let e = table.bytes.be64((firstL2 + i) * 8)
            if kind(of: e) == .normal && e & Qcow2Node.copied != 0 { break }
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

    /// Points the L2 entries at the newly written clusters and frees what they replaced. Lock held.
    private func commitAllocation(_ a: Allocation) async throws {
        let cs = Int64(clusterSize)
        let t = try await l2TableForWrite(a.l1Index)
        for i in 0..<a.oldEntries.count {
            t.bytes.setBE64((a.firstL2 + i) * 8, UInt64(a.host + Int64(i) * cs) | Qcow2Node.copied)
        }
        try await l2Cache.setDependency(on: refcountCache)
        l2Cache.markDirty(t)
        for e in a.oldEntries {
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
            try await hostFile.write(at: host, from: data, flags: [])
            return
        }
        // Where the previous content is all zeros, no data needs reading or copying.
        let headZero = head == 0 || oldReadsZero(oldEntries[0], guestStart)
        let tailZero = tail == 0 || oldReadsZero(oldEntries[oldEntries.count - 1], guestStart + total - cs)
        if headZero && tailZero {
            // Zero the clusters efficiently, then write the data (as QEMU does for zero
            // copy-on-write areas, so the host file is laid out the same).
            try await hostFile.writeZeroes(at: host, length: total, flags: [])
            try await hostFile.write(at: host + Int64(head), from: data, flags: [])
            return
        }
        let buf = AlignedBuffer(count: Int(total))
        try await buf.withUnsafeMutableBytes { b in
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

    // MARK: Zeroes and discard

    public func writeZeroes(at offset: Int64, length: Int64, flags: WriteFlags) async throws {
        try checkWritable("write zeroes")
        let cs = Int64(clusterSize)
        let end = offset + length
        // [offset, headEnd) and [tailStart, end) are partial clusters; between them whole
        // clusters (the last, partial cluster of an image whose size is unaligned counts as whole).
        let headEnd = min(end, (offset + cs - 1) / cs * cs)
        var tailStart = max(headEnd, end / cs * cs)
        if end == Int64(header.size) { tailStart = end }
        if header.version < 3 {
            try await zeroExplicitly(from: offset, to: end, flags: flags)
        } else {
            try await zeroExplicitly(from: offset, to: headEnd, flags: flags)
            if tailStart > headEnd {
                try await setZeroClusters(from: headEnd, to: tailStart, unmap: flags.contains(.mayUnmap))
            }
            try await zeroExplicitly(from: tailStart, to: end, flags: flags)
        }
        if flags.contains(.fua) { try await flush() }
    }

    private func zeroExplicitly(from start: Int64, to end: Int64, flags: WriteFlags) async throws {
        var pos = start
        while pos < end {
            await metaLock.lock()
            let m: Mapping
            do { m = try await lookup(pos, end - pos) } catch { metaLock.unlock(); throw error }
            metaLock.unlock()
            let n = m.length
            let alreadyZero = m.kind == .zero || m.kind == .zeroAllocated ||
                (m.kind == .unallocated && (backingNode == nil || pos >= backingNode!.length))
            if !alreadyZero {
                if flags.contains(.noFallback) {
                    throw BlockError(.unsupported, "write zeroes cannot be done efficiently here", errno: ENOTSUP, path: filename, offset: pos)
                }
                let zeros = AlignedBuffer(count: Int(min(n, 1 << 20)))
                var p = pos
                while p < pos + n {
                    let k = Int(min(Int64(zeros.count), pos + n - p))
                    try await zeros.withUnsafeBytes { z in
                        try await self.write(at: p, from: UnsafeRawBufferPointer(rebasing: z[0..<k]), flags: [])
                    }
                    p += Int64(k)
                }
            }
            pos += n
        }
    }

    /// Sets whole clusters in [start, end) to read as zeros (v3 zero flag).
    private func setZeroClusters(from start: Int64, to end: Int64, unmap: Bool) async throws {
        try await updateWholeClusters(from: start, to: end) { e in
            switch self.kind(of: e) {
            case .compressed: return (Qcow2Node.zeroFlag, true)
            case .normal, .zeroAllocated:
                if unmap || e & Qcow2Node.copied == 0 { return (Qcow2Node.zeroFlag, true) }
                return ((e & ~Qcow2Node.zeroFlag) | Qcow2Node.zeroFlag, false)
            case .zero: return (e, false)
            case .unallocated: return (Qcow2Node.zeroFlag, false)
            }
        }
    }

    public func discard(at offset: Int64, length: Int64) async throws {
        try checkWritable("discard")
        let cs = Int64(clusterSize)
        let start = (offset + cs - 1) / cs * cs
        var end = (offset + length) / cs * cs
        if offset + length == Int64(header.size) { end = (offset + length + cs - 1) / cs * cs }
        guard end > start else { return }
        let v3 = header.version >= 3
        let hasBacking = backingNode != nil || header.backingFileName != nil
        try await updateWholeClusters(from: start, to: end, punchFreed: true) { e in
            let k = self.kind(of: e)
            let allocated = k == .normal || k == .zeroAllocated || k == .compressed
            let newEntry: UInt64 = (v3 && (hasBacking || allocated)) ? Qcow2Node.zeroFlag : 0
            if k == .unallocated && !v3 { return (e, false) }
            return (newEntry, allocated)
        }
    }

    /// Applies `transform` to the L2 entries of whole clusters in [start, end), freeing the
    /// old host cluster when it says so. Waits for allocations in flight.
    private func updateWholeClusters(from start: Int64, to end: Int64, punchFreed: Bool = false,
                                     _ transform: @escaping (UInt64) -> (UInt64, Bool)) async throws {
        let cbits = Int64(clusterBits)
        var cluster = start >> cbits
        let endCluster = (end + Int64(clusterSize) - 1) >> cbits
        while cluster < endCluster {
            await metaLock.lock()
            let l1Index = Int(cluster / Int64(l2Entries))
            let firstL2 = Int(cluster % Int64(l2Entries))
            let n = min(endCluster - cluster, Int64(l2Entries - firstL2))
            guard await waitForInflight(cluster, n) else { continue }
            do {
                if l1Index >= l1Table.count { metaLock.unlock(); return }
                // Nothing to do for a missing L2 table whose clusters stay unallocated.
                let l2 = try await l2Offset(l1Index)
                if l2 == 0 && transform(0).0 == 0 {
                    metaLock.unlock()
                    cluster += n
                    continue
                }
                let t = try await l2TableForWrite(l1Index)
                l2Cache.pin(t)
                defer { l2Cache.release(t) }
                var changed = false
                for i in 0..<Int(n) {
                    let old = t.bytes.be64((firstL2 + i) * 8)
                    let (new, free) = transform(old)
                    if new == old { continue }
                    t.bytes.setBE64((firstL2 + i) * 8, new)
                    changed = true
                    if free {
                        // The L2 change must reach the disk before the refcount drop.
                        l2Cache.markDirty(t)
                        switch kind(of: old) {
                        case .compressed: try await freeCompressed(entry: old)
                        case .normal, .zeroAllocated:
                            let host = Int64(old & Qcow2Node.l2OffsetMask)
                            // Give the space back to the host file system while the cluster
                            // cannot yet be reused (the lock is held).
                            if punchFreed && old & Qcow2Node.copied != 0 {
                                try? await hostFile.discard(at: host, length: Int64(clusterSize))
                            }
                            try await freeClusters(at: host, count: 1)
                        default: break
                        }
                    }
                }
                if changed { l2Cache.markDirty(t) }
                metaLock.unlock()
            } catch {
                metaLock.unlock()
                throw error
            }
            cluster += n
        }
    }

    // MARK: Block status

    public func blockStatus(at offset: Int64, length: Int64) async throws -> BlockStatus {
        await metaLock.lock()
        let m: Mapping
        do { m = try await lookup(offset, length) } catch { metaLock.unlock(); throw error }
        metaLock.unlock()
        switch m.kind {
        case .unallocated:
            let zero = backingNode == nil || offset >= backingNode!.length
            if let b = backingNode, offset < b.length, offset + m.length > b.length {
                return BlockStatus(flags: [], length: b.length - offset)
            }
            return BlockStatus(flags: zero ? [.zero] : [], length: m.length)
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
