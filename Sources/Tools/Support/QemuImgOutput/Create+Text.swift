import QBlock

extension ImageCreator.Plan {
    /// What `qemu-img create` prints before it creates the image:
    /// `Formatting 'FILE', fmt=FORMAT` and every option that has a value (given, or the
    /// format's default), in the order of the format's ``FormatDriver/createOptions``;
    /// commas in string values doubled, as QemuOpts prints them.
    package var formattingLine: String {
        var line = "Formatting '\(path)', fmt=\(format)"
        for desc in FormatRegistry.driver(named: format)?.createOptions ?? [] {
            guard let v = values[desc.name] ?? desc.defaultValue else { continue }
            line += " \(desc.name)=" + (desc.type == .string ? v.split(separator: ",", omittingEmptySubsequences: false).joined(separator: ",,") : v)
        }
        return line
    }
}
