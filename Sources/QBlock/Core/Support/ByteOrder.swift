/// Big-endian field access on byte arrays and raw buffers, one field at a time
/// (on-disk structures are never byte-swapped as whole structs).
extension UnsafeRawBufferPointer {
    @inlinable @inline(__always) package func be64(_ at: Int) -> UInt64 {
        UInt64(bigEndian: loadUnaligned(fromByteOffset: at, as: UInt64.self))
    }
    @inlinable @inline(__always) package func be32(_ at: Int) -> UInt32 {
        UInt32(bigEndian: loadUnaligned(fromByteOffset: at, as: UInt32.self))
    }
    @inlinable @inline(__always) package func be16(_ at: Int) -> UInt16 {
        UInt16(bigEndian: loadUnaligned(fromByteOffset: at, as: UInt16.self))
    }
}

extension UnsafeMutableRawBufferPointer {
    @inlinable @inline(__always) package func be64(_ at: Int) -> UInt64 {
        UInt64(bigEndian: loadUnaligned(fromByteOffset: at, as: UInt64.self))
    }
    // SAFETY: callers pass an offset with `at + size` inside the buffer (bounds-checked in debug
    // builds); `storeBytes` has no alignment requirement.
    @inlinable @inline(__always) package func setBE64(_ at: Int, _ v: UInt64) {
        storeBytes(of: v.bigEndian, toByteOffset: at, as: UInt64.self)
    }
    @inlinable @inline(__always) package func setBE32(_ at: Int, _ v: UInt32) {
        storeBytes(of: v.bigEndian, toByteOffset: at, as: UInt32.self)
    }
    @inlinable @inline(__always) package func setBE16(_ at: Int, _ v: UInt16) {
        storeBytes(of: v.bigEndian, toByteOffset: at, as: UInt16.self)
    }
}

extension Array where Element == UInt8 {
    // SAFETY: each helper's pointer is used only inside its closure, for the array's own bytes or one
    // local integer; offsets are the caller's, within `count`.
    @inlinable package func be64(_ at: Int) -> UInt64 { withUnsafeBytes { $0.be64(at) } }
    @inlinable package func be32(_ at: Int) -> UInt32 { withUnsafeBytes { $0.be32(at) } }
    @inlinable package mutating func appendBE64(_ v: UInt64) { Swift.withUnsafeBytes(of: v.bigEndian) { append(contentsOf: $0) } }
    @inlinable package mutating func appendBE32(_ v: UInt32) { Swift.withUnsafeBytes(of: v.bigEndian) { append(contentsOf: $0) } }
    @inlinable package mutating func appendBE16(_ v: UInt16) { Swift.withUnsafeBytes(of: v.bigEndian) { append(contentsOf: $0) } }
    @inlinable package mutating func setBE64(_ at: Int, _ v: UInt64) { withUnsafeMutableBytes { $0.setBE64(at, v) } }
    @inlinable package mutating func setBE32(_ at: Int, _ v: UInt32) { withUnsafeMutableBytes { $0.setBE32(at, v) } }
}
