import QBlockCore
import QBlockDrivers
import QBlockGraph
/// The outcome of `qemu-img check` on one image (QAPI's `ImageCheck`); the tools render it
/// as qemu-img prints it.
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
}
