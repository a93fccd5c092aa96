import QBlock

/// `qemu-img info`'s two output formats, from the library's ``ImageInfo`` data.
extension ImageInfo {
    /// `qemu-img info` human output for this image (`bdrv_image_info_dump`), newline-terminated.
    package var humanText: String {
        var s = "image: \(filename)\n"
        s += "file format: \(format)\n"
        s += "virtual size: \(qemuSizeString(virtualSize)) (\(virtualSize) bytes)\n"
        s += "disk size: \(actualSize.map(qemuSizeString) ?? "unavailable")\n"
        if let clusterSize { s += "cluster_size: \(clusterSize)\n" }
        if dirty { s += "cleanly shut down: no\n" }
        if let backingFilename {
            s += "backing file: \(backingFilename)"
            if let full = fullBackingFilename {
                if full != backingFilename { s += " (actual path: \(full))" }
            } else {
                s += " (cannot determine actual path)"
            }
            s += "\n"
            if let backingFormat { s += "backing file format: \(backingFormat)\n" }
        }
        if let snapshots { s += SnapshotInfo.listText(snapshots) }
        if let formatSpecific, let data = formatSpecific["data"] {
            s += "Format specific information:\n"
            s += data.humanDump(indent: 1)
        }
        return s
    }

    /// The JSON `qemu-img info --output=json` prints (without the final newline).
    package var jsonText: String { qobject.prettyJSON }

    /// Renders a list of infos as `qemu-img info [--backing-chain]` does. The result ends with
    /// a newline.
    package static func render(_ infos: [ImageInfo], json: Bool, backingChain: Bool) -> String {
        if json {
            if backingChain { return QObject.list(infos.map(\.qobject)).prettyJSON + "\n" }
            return (infos.first?.jsonText ?? "{}") + "\n"
        }
        return infos.map(\.humanText).joined(separator: "\n")
    }
}
