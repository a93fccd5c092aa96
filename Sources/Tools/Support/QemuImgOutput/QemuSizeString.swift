#if canImport(Glibc)
import Glibc
#endif
import QBlock

/// Sizes for people, as QEMU's `size_to_str` writes them: "1 GiB", "196 KiB", "1.5 MiB"
/// (`qemu-img info`'s virtual and disk size, the VM SIZE column of the snapshot list).
package func qemuSizeString(_ value: Int64) -> String {
    let suffixes = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"]
    let v = Double(UInt64(bitPattern: value))
    var exp: Int32 = 0
    _ = frexp(v / (1000.0 / 1024.0), &exp)
    let i = max(0, min(6, Int((exp - 1) / 10)))
    let div = Double(UInt64(1) << UInt64(i * 10))
    return cFormat("%0.3g", v / div) + " " + suffixes[i] + "B"
}
