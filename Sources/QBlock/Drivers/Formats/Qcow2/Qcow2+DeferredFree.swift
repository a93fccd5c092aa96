import QBlockCore
/// Giving clusters back when the host file refuses writes (ENOSPC, EIO).
///
/// Two kinds of release, as in QEMU (`qcow2_alloc_cluster_abort`, `qcow2_free_clusters`):
/// - clusters allocated for a request that then failed were never referenced by any table,
///   so their counts drop with no ordering against the L2 cache
///   (``releaseUnreferenced(_:_:)``);
/// - clusters whose last reference was just dropped wait for the L2 change to reach the
///   disk first (``freeClusters(at:count:discardHost:)`` makes the refcount cache depend on
///   the L2 cache).
///
/// Unlike QEMU, which leaks a cluster whose free fails, neither kind depends on the failing
/// write path: a count that cannot be changed now (its refcount block cannot be loaded, or
/// the L2 cache could not be written ahead of it) waits in ``pendingFrees`` and is changed at
/// the next flush, which fails, and keeps it, while the disk still refuses. A process killed
/// in between leaks those clusters, as QEMU's would; it never corrupts the image.
extension Qcow2Node {
    struct PendingFree {
        var cluster: Int64
        var count: Int64
        var discardHost: Bool
    }

    /// Whether a failed refcount change may be retried later (an I/O failure), rather than
    /// being a sign of corruption that retrying would only repeat.
    func isRetryable(_ error: Error) -> Bool {
        guard let e = error as? BlockError else { return false }
        return e.code != .corrupt && e.code != .internalError
    }

    /// Drops one reference to each of `count` clusters from `first` that no table references
    /// (they were allocated for a request that failed). Never fails: what cannot be done now
    /// is done at the next flush. Lock held.
    func releaseUnreferenced(_ first: Int64, _ count: Int64) async {
        var c = first
        while c < first + count {
            do {
                try await updateRefcount(c, by: -1)
            } catch {
                if isRetryable(error) {
                    pendingFrees.append(PendingFree(cluster: c, count: first + count - c, discardHost: false))
                    return
                }
                // Underflow: already signalled as corruption; nothing sensible to retry.
            }
            c += 1
        }
    }

    /// Applies the frees that could not be made when they were asked for. The file is synced
    /// first, so that whatever dropped the references (an L1 or header write made directly)
    /// is on disk before a count reaches zero and its cluster can be reused. Lock held.
    /// - Throws: the I/O error that still prevents them (they stay pending).
    func retryPendingFrees() async throws {
        guard !pendingFrees.isEmpty else { return }
        try await hostFile.flush()
        while let p = pendingFrees.first {
            try await refcountCache.setDependency(on: l2Cache)
            var c = p.cluster
            while c < p.cluster + p.count {
                do {
                    try await updateRefcount(c, by: -1, discardHost: p.discardHost)
                } catch {
                    if isRetryable(error) {
                        pendingFrees[0] = PendingFree(cluster: c, count: p.cluster + p.count - c, discardHost: p.discardHost)
                        throw error
                    }
                }
                c += 1
            }
            pendingFrees.removeFirst()
        }
    }
}
