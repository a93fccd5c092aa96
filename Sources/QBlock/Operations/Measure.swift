import QBlockCore
import QBlockGraph
import QBlockOpen
/// `qemu-img measure`: checks the options as qemu-img does, then asks the target format's
/// driver (``Measurable``, QEMU's `bdrv_measure`) for the sizes.
public enum Measure {
    /// Options accepted with `-o` besides the format's creation options (the file protocol's).
    static let protocolOptions = ["nocow", "extent_size_hint"]

    /// Measures a new image of `format` with creation `options`, either of `size` bytes or
    /// converted from `source`.
    /// - Throws: ``BlockError`` with qemu-img's message (an invalid option is reported with a
    ///   second line "Invalid options for file format '...'").
    public static func measure(format: String, options: [(String, String)], size: Int64?,
                               source: (any BlockDriver)?) async throws -> MeasureResult {
        guard let driver = FormatRegistry.driver(named: format) else {
            throw BlockError(.invalidArgument, "Unknown file format '\(format)'")
        }
        let table = driver.createOptions
        let measurable = driver as? any Measurable.Type
        var values: [String: String] = [:]
        for (k, v) in options {
            let known = table.contains { $0.name == k } || protocolOptions.contains(k)
                || (measurable?.measureOnlyOptions.contains(k) ?? false)
            guard known else {
                throw BlockError(.invalidArgument, "Invalid parameter '\(k)'\nInvalid options for file format '\(format)'")
            }
            if let desc = table.first(where: { $0.name == k }), desc.type == .size {
                guard let n = SizeParser.parse(v) else {
                    throw BlockError(.invalidArgument, "Parameter '\(k)' expects a non-negative number below 2^64\n"
                        + ImageCreator.sizeHint + "\nInvalid options for file format '\(format)'")
                }
                values[k] = String(n)
            } else {
                values[k] = v
            }
        }
        if let size { values["size"] = String(size) }
        guard let measurable else {
            throw BlockError(.unsupported, "Format driver '\(format)' does not support size measurement")
        }
        let measured = source.map { node in
            MeasureSource(node: node, length: qemuLength(node)) { offset, length in
                let e = try await BlockMap.status(of: node, at: offset, length: length)
                return MeasureSource.Run(length: e.length, zero: e.zero, data: e.data, present: e.present)
            }
        }
        return try await measurable.measure(options: values, source: measured)
    }
}
