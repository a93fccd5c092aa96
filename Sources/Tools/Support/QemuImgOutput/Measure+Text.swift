import QBlock

/// `qemu-img measure`'s output formats, from the library's ``MeasureResult``.
extension MeasureResult {
    /// `qemu-img measure --output=json`, newline-terminated.
    package var jsonText: String {
        var d = QObject.Dict()
        d["required"] = .int(required)
        d["fully-allocated"] = .int(fullyAllocated)
        if let bitmaps { d["bitmaps"] = .int(bitmaps) }
        return QObject.dict(d).prettyJSON + "\n"
    }

    /// `qemu-img measure` human output, newline-terminated.
    package var humanText: String {
        var s = "required size: \(required)\nfully allocated size: \(fullyAllocated)\n"
        if let bitmaps { s += "bitmaps size: \(bitmaps)\n" }
        return s
    }
}
