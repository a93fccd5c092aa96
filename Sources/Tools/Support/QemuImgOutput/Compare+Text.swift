import QBlock

extension ImageComparison {
    /// The lines `qemu-img compare` prints on standard output for this result (without `-q`).
    package var reportText: String {
        var s = sizeMismatchWarning ? "Warning: Image size mismatch!\n" : ""
        switch difference {
        case .none: s += "Images are identical.\n"
        case .content(let o): s += "Content mismatch at offset \(o)!\n"
        case .blockStatus(let o): s += "Strict mode: Offset \(o) block status mismatch!\n"
        case .size: s = "Strict mode: Image size mismatch!\n"
        }
        return s
    }
}
