#if canImport(Glibc)
import Glibc
#endif

/// qemu-io's byte patterns (`-P pattern`) and its hex dump of what was read (`read -v`).
package enum Pattern {
    /// Parses a pattern byte as qemu-io does (`strtol` base 0: "171", "0xab", "0253"); nil unless 0...255.
    package static func parseByte(_ text: String) -> UInt8? {
        text.withCString { p -> UInt8? in
            var end: UnsafeMutablePointer<CChar>?
            errno = 0
            let v = strtol(p, &end, 0)
            guard let end, end.pointee == 0, v >= 0, v <= 255 else { return nil }
            return UInt8(v)
        }
    }

    /// Fills `buffer` with `byte`.
    package static func fill(_ buffer: UnsafeMutableRawBufferPointer, with byte: UInt8) {
        guard let base = buffer.baseAddress, buffer.count > 0 else { return }
        memset(base, Int32(byte), buffer.count)
    }

    /// Whether every byte of `buffer` equals `byte`.
    package static func matches(_ buffer: UnsafeRawBufferPointer, byte: UInt8) -> Bool {
        for b in buffer where b != byte { return false }
        return true
    }

    /// The offset (within `buffer`) of the first byte that differs from `byte`, if any.
    package static func firstMismatch(_ buffer: UnsafeRawBufferPointer, byte: UInt8) -> Int? {
        buffer.firstIndex { $0 != byte }
    }

    /// A hex dump in qemu-io's format (`read -v`): lines of up to 16 bytes,
    /// `"%08x:  "`, each byte `"%02x "`, a space, then the alphanumeric bytes with `.` for the rest.
    package static func hexDump(_ buffer: UnsafeRawBufferPointer, offset: Int64) -> String {
        let hex = Array("0123456789abcdef".utf8)
        var out: [UInt8] = []
        out.reserveCapacity(buffer.count / 16 * 78 + 80)
        var i = 0
        while i < buffer.count {
            let addr = String(UInt64(bitPattern: offset &+ Int64(i)), radix: 16)
            out.append(contentsOf: Array(repeating: UInt8(ascii: "0"), count: max(0, 8 - addr.utf8.count)))
            out.append(contentsOf: addr.utf8)
            out.append(contentsOf: Array(":  ".utf8))
            let end = min(i + 16, buffer.count)
            for j in i..<end {
                let b = buffer[j]
                out.append(hex[Int(b >> 4)])
                out.append(hex[Int(b & 15)])
                out.append(UInt8(ascii: " "))
            }
            out.append(UInt8(ascii: " "))
            for j in i..<end {
                let b = buffer[j]
                let alnum = (b >= 48 && b <= 57) || (b >= 65 && b <= 90) || (b >= 97 && b <= 122)
                out.append(alnum ? b : UInt8(ascii: "."))
            }
            out.append(UInt8(ascii: "\n"))
            i = end
        }
        return String(decoding: out, as: UTF8.self)
    }
}
