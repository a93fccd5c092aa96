import QBlock

/// Writes to standard error (unbuffered, as C's `stderr`).
package func writeStderr(_ s: String) {
    StandardStream.error.write(s)
}

/// Writes to standard output (buffered, as C's `stdout`; flushed at exit).
package func writeStdout(_ s: String) {
    StandardStream.output.write(s)
}

/// Writes what standard output holds buffered.
package func flushStdout() { StandardStream.output.flush() }

/// qemu-img's `-p` progress line: "    (12.34/100%)" rewritten in place.
@Sendable package func printProgress(_ value: Double) {
    writeStdout("    (\(percentText(value))/100%)\r")
    flushStdout()
}

/// A percentage as C's "%3.2f" prints it.
package func percentText(_ value: Double) -> String {
    let hundredths = Int((value * 100).rounded())
    let frac = hundredths % 100
    return "\(hundredths / 100)." + (frac < 10 ? "0" : "") + "\(frac)"
}
