import QBlock

extension Bench {
    /// The lines `qemu-img bench` prints before it starts.
    package var headerText: String {
        var s = "Sending \(count) \(write ? "write" : "read") requests, \(bufferSize) bytes each, \(depth) in parallel "
            + "(starting at offset \(offset), step size \(effectiveStep))\n"
        if flushInterval > 0 { s += "Sending flush every \(flushInterval) requests\n" }
        return s
    }

    /// "Run completed in 1.234 seconds.", newline-terminated.
    package static func completionText(seconds: Double) -> String {
        "Run completed in \(cFormat("%.3f", seconds)) seconds.\n"
    }
}
