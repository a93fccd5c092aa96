import QBlockCore
import QBlockDrivers
import QBlockGraph
import QBlockOpen
/// One run of `qemu-img map` output.
public struct MapEntry: Sendable, Equatable, CustomStringConvertible {
    /// Where the run starts in the guest's view, in bytes.
    public var start: Int64
    /// The run's length in bytes.
    public var length: Int64
    /// How far down the backing chain the run's content comes from (0: the top image).
    public var depth: Int64
    /// Whether the content is determined by the image at `depth` (false: unallocated
    /// everywhere and reading as zeros).
    public var present: Bool
    /// Whether the run reads as zeros.
    public var zero: Bool
    /// Whether the run holds data (as opposed to a hole or a zero cluster).
    public var data: Bool
    /// Where the run lies in `filename`, if it has a host location.
    public var offset: Int64?
    /// The protocol file holding the run (only with an `offset`).
    public var filename: String?

    /// Creates an entry; every parameter is the property of the same name.
    public init(start: Int64, length: Int64, depth: Int64, present: Bool, zero: Bool, data: Bool,
                offset: Int64? = nil, filename: String? = nil) {
        self.start = start
        self.length = length
        self.depth = depth
        self.present = present
        self.zero = zero
        self.data = data
        self.offset = offset
        self.filename = filename
    }

    /// The entry's fields, for people and logs (the tools print qemu-img's formats).
    public var description: String {
        var s = "start \(start) length \(length) depth \(depth)"
        if present { s += " present" }
        if zero { s += " zero" }
        if data { s += " data" }
        if let offset { s += " offset \(offset)" + (filename.map { " in \($0)" } ?? "") }
        return s
    }

    /// qemu-img's `entry_mergeable`: `next` continues this entry.
    func mergeable(with next: MapEntry) -> Bool {
        if length == 0 { return false }
        if zero != next.zero || data != next.data || depth != next.depth || present != next.present
            || (filename == nil) != (next.filename == nil) || (offset == nil) != (next.offset == nil) {
            return false
        }
        if let f = filename, f != next.filename { return false }
        if let o = offset, o + length != next.offset { return false }
        return true
    }
}

/// Computes `qemu-img map` over a node and its backing chain.
public enum BlockMap {
    /// The status of the run at `offset` (at most `length` bytes) as qemu-img's
    /// `get_block_status` sees it: the chain is walked down until a node says the run is
    /// data or zeros; a run unallocated in a format node without backing (or beyond the end
    /// of its backing node) reads as zeros there and is not "present"; in a node that
    /// cannot have a backing file it is neither data nor zeros and has no offset.
    public static func status(of node: any BlockDriver, at offset: Int64, length: Int64) async throws -> MapEntry {
        var bytes = length
        var depth: Int64 = 0
        // A filter (copy-on-read, mirror_top) answers for the node it filters, unless it
        // fails the query itself (blkdebug).
        var filter: any BlockDriver = node
        while let child = filter.filterChild {
            if let f = filter.innermostDriver as? any BlockStatusChecking, offset < filter.length {
                try f.checkBlockStatus(at: offset, length: min(length, filter.length - offset))
            }
            filter = child
        }
        var cur: any BlockDriver = node.skippingFilters
        while true {
            let nodeLength = qemuLength(cur)
            var s: BlockStatus
            if offset >= cur.length && !(cur is any PassThroughFormat || cur is any HostStorage) {
                // Past the node's end but inside its last sector: reads as zeros. (Raw and
                // file nodes answer this themselves, with the host offset.)
                s = BlockStatus(flags: [.zero, .allocated], length: min(bytes, max(1, nodeLength - offset)))
            } else if offset >= cur.length {
                s = try await cur.blockStatus(at: offset, length: min(bytes, nodeLength - offset))
            } else {
                s = try await cur.blockStatus(at: offset, length: min(bytes, cur.length - offset))
            }
            bytes = max(1, min(bytes, s.length))
            var flags = s.flags
            if flags.contains(.compressed) { s.hostOffset = nil }
            if let host = s.hostOffset, flags.contains(.data), !flags.contains(.zero),
               let r = cur as? any BlockStatusRecursing, let file = cur.file, r.recursesBlockStatusIntoFile {
                // QEMU asks the host file about data clusters of metadata-preallocated images
                // (BDRV_BLOCK_RECURSE): clusters that are holes there read as zeros.
                let f = try await file.blockStatus(at: host, length: bytes)
                if f.flags.contains(.zero) { flags.insert(.zero) }
                if host < file.length { bytes = max(1, min(bytes, f.length)) }
            }
            if !flags.contains(.data) && !flags.contains(.zero) {
                if let below = cur.backing {
                    if offset >= qemuLength(below) {
                        flags.insert(.zero)
                    } else {
                        cur = below.skippingFilters
                        depth += 1
                        continue
                    }
                } else if FormatRegistry.driver(named: cur.driverName)?.supportsBackingFile == true {
                    flags.insert(.zero)
                } else {
                    // A node that cannot have a backing file (nbd with an `x-dirty-bitmap`
                    // context, null-co without read-zeroes) says neither: qemu-img reports
                    // no status at all for the run, so no zeros and no offset.
                    s.hostOffset = nil
                }
            }
            let hostFile = s.hostOffset == nil ? nil : (cur.file ?? cur).filename
            return MapEntry(start: offset, length: bytes, depth: depth, present: flags.contains(.allocated),
                            zero: flags.contains(.zero), data: flags.contains(.data),
                            offset: s.hostOffset, filename: hostFile)
        }
    }

    /// The entries of `qemu-img map --output=json`, merged as qemu-img merges them.
    public static func entries(of node: any BlockDriver, start: Int64 = 0, maxLength: Int64? = nil) async throws -> [MapEntry] {
        var out: [MapEntry] = []
        try await walk(node, start: start, maxLength: maxLength) { e, _ in out.append(e) }
        return out
    }

    /// Walks the image as qemu-img's `img_map` loop does and hands each finished entry to
    /// `emit` together with the entry that follows it (nil for the last one). `emit` may
    /// change the following entry (the human format does, to merge more).
    package static func walk(_ node: any BlockDriver, start: Int64, maxLength: Int64?,
                             emit: (MapEntry, inout MapEntry?) throws -> Void) async throws {
        var length = qemuLength(node)
        if let maxLength { length = min(start + maxLength, length) }
        var curr = MapEntry(start: start, length: 0, depth: 0, present: false, zero: false, data: false)
        while curr.start + curr.length < length {
            let offset = curr.start + curr.length
            let next: MapEntry
            do {
                next = try await status(of: node, at: offset, length: length - offset)
            } catch {
                let e = error.asBlockError
                throw BlockError(e.code, "Could not read file metadata: \(e.message)", errno: e.errno, path: node.filename,
                                 offset: offset, operation: "map")
            }
            if curr.mergeable(with: next) {
                curr.length += next.length
                continue
            }
            var n: MapEntry? = next
            if curr.length > 0 { try emit(curr, &n) }
            curr = n ?? next
        }
        var none: MapEntry? = nil
        try emit(curr, &none)
    }
}
