import QBlock

/// `qemu-img check`'s output formats and exit codes, from the library's ``ImageCheckReport``.
extension ImageCheckReport {
    /// qemu-img check's exit status for a format without checks
    /// (``ImageCheckReport/notSupportedMessage``).
    package static let notSupportedExitCode: Int32 = 63

    /// "The following inconsistencies were found and repaired: ..." (human format, not quiet).
    package static func repairedText(leaks: Int, corruptions: Int) -> String {
        "The following inconsistencies were found and repaired:\n\n    \(leaks) leaked clusters\n    \(corruptions) corruptions\n\n"
            + "Double checking the fixed image now...\n"
    }

    /// `qemu-img check --output=json`, newline-terminated.
    package var jsonText: String { qobject.prettyJSON + "\n" }

    /// `qemu-img check` human output, newline-terminated, exactly as qemu-img prints it for
    /// the same image. An image left dirty by a writer that did not close it checks as
    /// qemu-img checks it; ``CheckResult/notClosedCleanly`` tells a library caller, and
    /// `qemu-img info` shows the dirty bit.
    package var humanText: String {
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
    package var exitCode: Int32 {
        if result.checkErrors != 0 { return 1 }
        if result.corruptions != 0 { return 2 }
        if result.leaks != 0 { return 3 }
        return 0
    }
}

/// `printf("%0.2f")`.
private func fixed2(_ v: Double) -> String { cFormat("%0.2f", v) }
