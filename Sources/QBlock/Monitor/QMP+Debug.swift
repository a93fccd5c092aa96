import QBlockBitmaps
import QBlockCore
/// QEMU's debugging commands that test suites use: `x-debug-block-dirty-bitmap-sha256`.
extension QMPMonitor {
    func registerDebugCommands() {
        register("x-debug-block-dirty-bitmap-sha256") { args, ctx in
            let node = try args.string("node")
            let name = try args.string("name")
            try args.done()
            guard let n = ctx.graph.node(named: node) else { throw QMPError.generic("Node '\(node)' not found") }
            guard let bitmap = BitmapLookup.find(n, name) else { throw QMPError.generic("Dirty bitmap '\(name)' not found") }
            return .dict(QObject.Dict([("sha256", .string(SHA256.hex(Self.hbitmapWords(bitmap))))]))
        }
    }

    /// The bitmap's bits as QEMU's HBitmap keeps its last level: one bit per granule, in
    /// 64-bit little-endian words (bit i of word w is granule 64w + i), at least one word.
    static func hbitmapWords(_ b: DirtyBitmap) -> [UInt8] {
        let chunks = b.chunkCount
        let words = max((chunks + 63) / 64, 1)
        var bytes = [UInt8](repeating: 0, count: Int(words) * 8)
        var offset: Int64 = 0
        while let area = b.nextDirtyArea(from: offset) {
            let first = area.offset / b.granularity
            let last = (area.offset + area.length - 1) / b.granularity
            for c in first...last { bytes[Int(c / 8)] |= UInt8(1) << UInt8(c % 8) }
            offset = area.offset + area.length
        }
        return bytes
    }
}
