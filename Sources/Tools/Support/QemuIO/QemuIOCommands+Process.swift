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

    /// `reopen [-r|-w] [-c cache]`: makes the open image read-only or writable again and
    /// changes its host cache mode, in place (the format first when it becomes read-only,
    /// its file first when it becomes writable), as qemu-io's `reopen`.
    func reopen(_ argv: [String]) async -> Bool {
        guard let top = node else { return false }
        var readOnly: Bool?
        var cache: CacheMode?
        var failed = false
        let operands = parseOptions(argv, "c:o:rw") { c, arg in
            switch c {
            case "c":
                guard let mode = CacheMode(qemuName: arg ?? "") else {
                    report("Invalid cache option: \(arg ?? "")")
                    failed = true
                    return false
                }
                cache = mode
            case "r", "w":
                if readOnly != nil {
                    report("Only one -r/-w option may be given")
                    failed = true
                    return false
                }
                readOnly = c == "r"
            default:
                report("reopen -o is not supported yet: options cannot be changed on reopen")
                failed = true
                return false
            }
            return true
        }
        guard let operands, !failed else { return false }
        guard operands.isEmpty else { return usage("reopen") }
        let format = top.skippingFilters.innermostDriver
        let file = format.file?.innermostDriver
        let wantReadOnly = readOnly ?? format.isReadOnly
        let fileCache = cache ?? (file as? FileNode)?.cacheMode ?? .writeback
        await waitForRequests()
        do {
            guard let f = format as? any ReopenableDriver else {
                throw BlockError(.unsupported, "Block format '\(format.driverName)' used by device '' does not support reopening files",
                                 operation: "reopen")
            }
            let reopenableFile = file as? any ReopenableDriver
            if wantReadOnly {
                try await f.reopen(readOnly: true, cache: fileCache)
                try await reopenableFile?.reopen(readOnly: true, cache: fileCache)
            } else {
                try await reopenableFile?.reopen(readOnly: false, cache: fileCache)
                try await f.reopen(readOnly: false, cache: fileCache)
            }
            return true
        } catch {
            report(error.asBlockError.message)
            return false
        }
    }
}
