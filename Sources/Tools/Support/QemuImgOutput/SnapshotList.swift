#if canImport(Glibc)
import Glibc
#endif
import QBlock

/// The snapshot table of `qemu-img snapshot -l` and `qemu-img info` (`bdrv_snapshot_dump`).
extension SnapshotInfo {
    /// The column header of `qemu-img snapshot -l` and `qemu-img info`.
    package static let listHeader = "ID        TAG               VM SIZE                DATE     VM CLOCK     ICOUNT"

    /// This snapshot as one line of `qemu-img snapshot -l` (without the newline). The date
    /// is in local time, as QEMU prints it.
    package var listLine: String {
        var t = time_t(dateSeconds)
        var tm = tm()
        localtime_r(&t, &tm)
        var buf = [CChar](repeating: 0, count: 64)
        let n = strftime(&buf, buf.count, "%Y-%m-%d %H:%M:%S", &tm)
        let date = String(decoding: buf.prefix(n).map { UInt8(bitPattern: $0) }, as: UTF8.self)
        let secs = vmClockNanoseconds / 1_000_000_000
        let ms = (vmClockNanoseconds / 1_000_000) % 1000
        let clock = pad2(secs / 3600) + ":" + pad2((secs / 60) % 60) + ":" + pad2(secs % 60) + "."
            + (ms < 10 ? "00" : ms < 100 ? "0" : "") + String(ms)
        let icountText = icount.map { String(Int64(bitPattern: $0)) } ?? ""
        return leftAligned(id, 9) + " " + leftAligned(name, 16) + " " + rightAligned(qemuSizeString(Int64(bitPattern: vmStateSize)), 8)
            + rightAligned(date, 20) + rightAligned(clock, 13) + rightAligned(icountText, 11)
    }

    /// "Snapshot list:", the header and one line per snapshot, each newline-terminated;
    /// empty when there are none (as `qemu-img snapshot -l` prints).
    package static func listText(_ snapshots: [SnapshotInfo]) -> String {
        guard !snapshots.isEmpty else { return "" }
        return "Snapshot list:\n" + listHeader + "\n" + snapshots.map { $0.listLine + "\n" }.joined()
    }
}

private func pad2(_ v: UInt64) -> String { v < 10 ? "0\(v)" : "\(v)" }
/// printf's `%-Ns` / `%Ns` (counted in bytes, as C does).
private func leftAligned(_ s: String, _ width: Int) -> String {
    let n = s.utf8.count
    return n >= width ? s : s + String(repeating: " ", count: width - n)
}
private func rightAligned(_ s: String, _ width: Int) -> String {
    let n = s.utf8.count
    return n >= width ? s : String(repeating: " ", count: width - n) + s
}
