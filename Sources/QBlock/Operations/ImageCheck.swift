import QBlockCore
import QBlockDrivers
import QBlockGraph
/// The outcome of `qemu-img check` on one image, rendered as qemu-img renders it.
public struct ImageCheckReport: Sendable, Equatable {
    /// The checked image's file name.
    public var filename: String
    /// The checked image's format name.
    public var format: String
    /// The result of the final check (after repairs, the double check).
    public var result: CheckResult
    /// Leaks a repairing check fixed (zero without `-r`).
    public var leaksFixed = 0
    /// Corruptions a repairing check fixed (zero without `-r all`).
    public var corruptionsFixed = 0

    /// Creates a report; every parameter is the property of the same name.
    public init(filename: String, format: String, result: CheckResult, leaksFixed: Int = 0, corruptionsFixed: Int = 0) {
        self.filename = filename
        self.format = format
        self.result = result
        self.leaksFixed = leaksFixed
        self.corruptionsFixed = corruptionsFixed
    }

    /// The error qemu-img reports for images whose format has no consistency check (exit 63).
    public static let notSupportedMessage = "This image format does not support checks"
    /// qemu-img check's exit status for a format without checks.
    public static let notSupportedExitCode: Int32 = 63

    /// Checks `node` (a ``Checkable`` format) as `qemu-img check [-r ...]` does: a repairing check is
    /// followed by a plain one whose result is reported, with the repaired counts.
    /// - Parameter messages: receives every problem line each pass reports (qemu-img
    ///   prints them on stderr as the check runs).
    /// - Returns: the report, and the counts repaired by the first pass (nil without repair).
    public static func run(_ node: any BlockDriver, repair: CheckRepair?,
                           messages: (String) -> Void = { _ in }) async throws -> (report: ImageCheckReport, repaired: (leaks: Int, corruptions: Int)?) {
        guard let q = node as? any Checkable else {
            throw BlockError(.unsupported, notSupportedMessage, path: node.filename, operation: "check")
        }
        let result = try await q.check(repair: repair)
        result.messages.forEach(messages)
        var report = ImageCheckReport(filename: node.filename, format: node.driverName, result: result)
        guard repair != nil, result.leaksFixed != 0 || result.corruptionsFixed != 0 else { return (report, nil) }
        let fixed = (leaks: result.leaksFixed, corruptions: result.corruptionsFixed)
        let again = try await q.check(repair: nil)
        again.messages.forEach(messages)
        report.result = again
        report.leaksFixed = fixed.leaks
        report.corruptionsFixed = fixed.corruptions
        return (report, fixed)
    }

    /// "The following inconsistencies were found and repaired: ..." (human format, not quiet).
    public static func repairedText(leaks: Int, corruptions: Int) -> String {
        "The following inconsistencies were found and repaired:\n\n    \(leaks) leaked clusters\n    \(corruptions) corruptions\n\n"
            + "Double checking the fixed image now...\n"
    }

    /// The QAPI `ImageCheck` object (fields that are zero are left out, as qemu-img does).
    public var qobject: QObject {
        let r = result
        var d = QObject.Dict()
        d["filename"] = .string(filename)
        d["format"] = .string(format)
        d["check-errors"] = .int(Int64(r.checkErrors))
        func opt(_ k: String, _ v: Int64) { if v != 0 { d[k] = .int(v) } }
        opt("image-end-offset", r.imageEndOffset)
        opt("corruptions", Int64(r.corruptions))
        opt("leaks", Int64(r.leaks))
        opt("corruptions-fixed", Int64(corruptionsFixed))
        opt("leaks-fixed", Int64(leaksFixed))
        opt("total-clusters", r.totalClusters)
        opt("allocated-clusters", r.allocatedClusters)
        opt("fragmented-clusters", r.fragmentedClusters)
        opt("compressed-clusters", r.compressedClusters)
        return .dict(d)
    }

    /// `qemu-img check --output=json`, newline-terminated.
    public var jsonText: String { qobject.prettyJSON + "\n" }

    /// `qemu-img check` human output, newline-terminated, exactly as qemu-img prints it for
    /// the same image. An image left dirty by a writer that did not close it checks as
    /// qemu-img checks it; ``CheckResult/notClosedCleanly`` tells a library caller, and
    /// `qemu-img info` shows the dirty bit.
    public var humanText: String {
        let r = result
        var s = ""
        if r.corruptions == 0 && r.leaks == 0 && r.checkErrors == 0 {
            s += "No errors were found on the image.\n"
        } else {
            if r.corruptions != 0 {
                s += "\n\(r.corruptions) errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n"
            }
            if r.leaks != 0 {
                s += "\n\(r.leaks) leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n"
            }
            if r.checkErrors != 0 {
                s += "\n\(r.checkErrors) internal errors have occurred during the check.\n"
            }
        }
        if r.totalClusters != 0 && r.allocatedClusters != 0 {
            let alloc = Double(r.allocatedClusters)
            s += "\(r.allocatedClusters)/\(r.totalClusters) = \(fixed2(alloc * 100 / Double(r.totalClusters)))% allocated, "
                + "\(fixed2(Double(r.fragmentedClusters) * 100 / alloc))% fragmented, "
                + "\(fixed2(Double(r.compressedClusters) * 100 / alloc))% compressed clusters\n"
        }
        if r.imageEndOffset != 0 { s += "Image end offset: \(r.imageEndOffset)\n" }
        return s
    }

    /// qemu-img's exit code: 0 clean, 2 corruptions, 3 leaks only, 1 when the check had errors.
    public var exitCode: Int32 {
        if result.checkErrors != 0 { return 1 }
        if result.corruptions != 0 { return 2 }
        if result.leaks != 0 { return 3 }
        return 0
    }
}

/// `printf("%0.2f")`.
func fixed2(_ v: Double) -> String { cFormat("%0.2f", v) }
