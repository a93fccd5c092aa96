import QBlock
#if canImport(Glibc)
import Glibc
#endif

extension QemuIOSession {
    /// `abort`: ends the process with abort(3), leaving the image as a crash would (QEMU's
    /// tests use it to leave persistent bitmaps marked in use). Like qemu-io, it does not
    /// flush standard output first: output still buffered is lost with the process.
    func crash() -> Bool {
        abort()
    }

    /// `sigraise signal`: flushes standard output and error and raises `signal` in this
    /// process (QEMU's tests kill qemu-io with it mid-session, to leave an image as a crash
    /// would).
    func sigraise(_ argv: [String]) -> Bool {
        let text = argv[1]
        switch QemuNumbers.parseSize(text, warning: { self.report("warning: " + $0) }) {
        case .failure(let e):
            out(QemuNumbers.message(for: e, argument: text) + "\n")
            return false
        case .success(let signal):
            // (NSIG: 65 on Linux, one past the last real-time signal.)
            guard signal <= 65 else {
                out("signal argument '\(text)' is too large to be a valid signal\n")
                return false
            }
            flushStdout()  // (standard error is written unbuffered)
            raise(Int32(signal))
            return true
        }
    }

    /// `reopen [-r|-w] [-c cache] [-o options]`: makes the open image read-only or writable
    /// again, changes its host cache mode and the options given (``DriveReopen``), in
    /// place, as qemu-io's `reopen`.
    func reopen(_ argv: [String]) async -> Bool {
        guard let top = node else { return false }
        var request = DriveReopen.Request()
        var failed = false
        let operands = parseOptions(argv, "c:o:rw") { c, arg in
            switch c {
            case "c":
                guard let mode = CacheMode(qemuName: arg ?? "") else {
                    report("Invalid cache option: \(arg ?? "")")
                    failed = true
                    return false
                }
                request.cache = mode
            case "r", "w":
                if request.readOnly != nil {
                    report("Only one -r/-w option may be given")
                    failed = true
                    return false
                }
                request.readOnly = c == "r"
            default:
                do {
                    // (Several -o merge, as qemu-io's option list does.)
                    for (k, v) in try DriveOptions.parse(arg ?? "").entries { request.options[k] = v }
                } catch {
                    report(error.asDriveMessage)
                    failed = true
                    return false
                }
            }
            return true
        }
        guard let operands, !failed else { return false }
        guard operands.isEmpty else { return usage("reopen") }
        let file = top.skippingFilters.innermostDriver.file?.innermostDriver
        let currentCache = (file as? FileNode)?.cacheMode ?? .writeback
        await waitForRequests()
        do {
            let outcome = try await DriveReopen.reopen(top, opened: openedOptions, request: request, currentCache: currentCache)
            openedOptions = outcome.options
            if let u = outcome.unmap { unmap = u }
            return true
        } catch {
            report(error.asDriveMessage)
            return false
        }
    }
}
