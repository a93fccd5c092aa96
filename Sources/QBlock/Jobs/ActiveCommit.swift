import QBlockCore
import QBlockDrivers
import QBlockGraph
import QBlockOpen
/// `block-commit` of the active layer (QEMU's `commit_active_start`): a mirror from the top
/// node into a node of its backing chain, copying only what lies above that node. It
/// becomes ready like a mirror; `block-job-complete` switches every user of the top to
/// the base, which then holds everything the top showed.
public enum ActiveCommit {
    /// Makes the commit job's driver: reopens `base` read-write (in place in the chain),
    /// then mirrors `top` into it.
    /// - Parameters:
    ///   - top: the active node (users' backends point at it).
    ///   - base: a node below `top` in its backing chain (default: the deepest, as QEMU's).
    ///   - graph: the graph holding `top` and its users.
    ///   - copyMode: whether writers wait for their copy (`copy-mode`).
    ///   - onError: what a read or write error does (`on-error`).
    ///   - filterNodeName: the node name of the mirror's filter above `top` (`filter-node-name`); nil: generated.
    /// - Throws: ``BlockError`` when `base` is not below `top`, or the reopen fails.
    public static func make(top: BlockNode, base: (any BlockDriver)? = nil, graph: BlockGraph,
                            copyMode: MirrorCopyMode = .background, onError: BlockdevOnError = .report,
                            filterNodeName: String? = nil) async throws -> MirrorJob {
        guard let b = base ?? (top.backing == nil ? nil : top.backingChain.last) else {
            throw BlockError(.invalidArgument, "Top image has no backing file", operation: "block-commit")
        }
        guard top.backingChain.dropFirst().contains(where: { $0 === b }) else {
            throw BlockError(.invalidArgument, "Base '\(b.filename)' not found", operation: "block-commit")
        }
        var above: any BlockDriver = top
        while let next = above.backing, next !== b { above = next }
        let overlay = above.innermostDriver as? any BackingLinked
        let writable = try await graph.drained { try await BlockReopen.readWrite(b, overlay: overlay, graph: graph) }
        let target = writable as? BlockNode ?? BlockNode(nodeName: graph.generateNodeName(), driver: writable)
        var options = MirrorOptions(sync: .top, copyMode: copyMode, onSourceError: onError, onTargetError: onError,
                                    commitBase: writable)
        options.filterNodeName = filterNodeName
        return try MirrorJob(source: top, target: target, graph: graph, options: options, type: .commit)
    }
}
