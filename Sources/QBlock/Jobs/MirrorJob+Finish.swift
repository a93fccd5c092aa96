import QBlockBitmaps
import QBlockCore
import QBlockDrivers
import QBlockGraph
/// The end of a mirror: the final pass and the switch to the target (pivot), or the
/// return of the users to the source; and the persistent bitmap's lazy clean bits.
extension MirrorJob {
    /// Makes the side file's clean bits durable: with every copy and write-blocking write
    /// held off (the whole disk's range), the target is flushed, then the persistent bits
    /// become the job's bits (clusters copied since the last persist are now durable on the
    /// target) and the 0 bits are written. Call only with no copy in flight.
    ///
    /// Between two persists a copied cluster stays marked in the file even though the job
    /// already reset its bit: a flush then finds it still dirty there, so a crash before the
    /// target is flushed cannot lose a flushed write.
    func persist() async throws {
        guard let side = lock.withLock({ sideFile }), let persisted = lock.withLock({ persistentBitmap }) else { return }
        try await ranges.withRange(0, max(1, sourceNode.length)) {
            try await targetNode.flush()
            // Writers mark the job's bitmap before the persistent one, so a mark racing
            // with this rebuild is kept by the merge.
            persisted.clear()
            try persisted.merge(from: bitmap)
            _ = try await side.writeBackClean()
        }
    }

    /// The final pass, inside a drained section: what writers dirtied last is copied, the
    /// target flushed; then every user of the filter is switched to the target (complete)
    /// or back to the source (cancel after ready).
    package func prepare(_ job: Job) async throws {
        let pivot = lock.withLock { shouldComplete } && !job.isCancelRequested
        guard let filter = lock.withLock({ filterNode }) else { return }
        // Flush the target before holding writers (as snapshots do): the flush inside the
        // drained section then only has the last pass's writes left.
        try? await targetNode.flush()
        let t0 = Trace.now()
        var t1: Int64 = 0, t2: Int64 = 0, t3: Int64 = 0
        defer { Trace.log("mirror prepare: drain \(t1 - t0) us, final copy \(t2 - t1) us, target flush \(t3 - t2) us, switch+undrain \(Trace.now() - t3) us") }
        try await graph.drained {
            t1 = Trace.now()
            while let area = nextDirty(from: 0) {
                bitmap.reset(offset: area.offset, length: area.length)
                lock.withLock { bytesInFlight += area.length }
                do { try await copyOrThrow(area, job) } catch {
                    bitmap.mark(offset: area.offset, length: area.length)
                    throw error
                }
            }
            t2 = Trace.now()
            try await targetNode.flush()
            t3 = Trace.now()
            (filter.driver as? MirrorTopNode)?.detachJob()
            if pivot {
                // drive-mirror's sync=top/none target continues into the source's chain:
                // its backing becomes the source's backing node (top) or the source (none).
                if options.commitBase == nil, let b = options.targetBacking {
                    guard let linked = targetNode.skippingFilters.innermostDriver as? any BackingLinked else {
                        throw BlockError(.unsupported, "Target '\(targetNode.nodeName)' (\(targetNode.driverName)) cannot take a backing file",
                                         operation: "mirror")
                    }
                    if !(linked.backing?.isSameNode(as: b) ?? false) { linked.setBackingNode(b) }
                }
                if graph.node(named: targetNode.nodeName) == nil { try? graph.add(targetNode) }
                graph.replace(filter, with: targetNode)
            } else {
                graph.replace(filter, with: sourceNode)
            }
            graph.forget(filter)
            lock.withLock { filterNode = nil }
        }
        try await persist()
    }

    /// Copies one area, throwing on any error (the final pass has no error policy left to apply).
    private func copyOrThrow(_ area: (offset: Int64, length: Int64), _ job: Job) async throws {
        defer { lock.withLock { bytesInFlight -= area.length } }
        let buf = AlignedBuffer(count: Int(area.length))
        try await buf.withUnsafeMutableBytes { b in
            try await sourceNode.read(at: area.offset, into: b)
            try await targetNode.write(at: area.offset, from: UnsafeRawBufferPointer(b), flags: [])
        }
        job.progressDone(UInt64(area.length))
    }

    package func commit(_ job: Job) async {}

    /// A failed or force-cancelled mirror: the users go back to the source.
    package func abort(_ job: Job) async {
        guard let filter = lock.withLock({ filterNode }) else { return }
        await graph.drained {
            (filter.driver as? MirrorTopNode)?.detachJob()
            graph.replace(filter, with: sourceNode)
            graph.forget(filter)
        }
        lock.withLock { filterNode = nil }
        try? await persist()
    }

    /// Closes the side file (its bits stay: all clear after a completed mirror).
    package func clean(_ job: Job) async {
        let side: BitmapSideFile? = lock.withLock {
            defer { sideFile = nil }
            return sideFile
        }
        try? await side?.close()
    }
}
