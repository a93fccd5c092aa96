import QBlock

/// The options of qemu-io's request commands (`read`, `readv`, `aio_read`, `write`, `writev`,
/// `aio_write`, `discard`), each letter meaning what it means in qemu-io. Only `-s` differs:
/// the pattern offset of `read`, the source file of `write`.
struct RequestArguments: Sendable {
    /// `-C`: report in the machine-readable form.
    var machine = false
    /// `-q`: no report.
    var quiet = false
    /// `-v`: hex-dump what was read.
    var verbose = false
    /// `-b`: the VM state area, not the disk.
    var vmstate = false
    /// `-c`: a compressed write.
    var compressed = false
    /// `-z`: write zeroes.
    var zero = false
    /// `-i`: an invalid request on purpose (`aio_read`, `aio_write`); the options after it
    /// are not looked at.
    var inject = false
    /// `-P`: the byte to write, or the one the read data must hold.
    var pattern: UInt8?
    /// `-f`: force unit access.
    var flags: WriteFlags = []
    /// `-n` and `-u`: zero writes without fallback, allowed to unmap.
    var zeroFlags: WriteFlags = []
    /// `write -s`: the file whose contents are written.
    var sourceFile: String?
    /// `read -s`: where in the read data the pattern check starts.
    var patternOffset: Int64?
    /// `read -l`: how many bytes the pattern check covers.
    var patternLength: Int64?
    /// The words after the options (offset and lengths).
    var operands: [String] = []
}

extension QemuIOSession {
    /// Walks the options of `argv` (the command name first) as qemu-io's getopt loops do,
    /// handing each to `handle` in order; an unknown option or a missing argument prints
    /// getopt's message and the command's usage.
    /// - Parameter handle: takes an option letter and its argument; returns false to end the
    ///   command there.
    /// - Returns: the operands, or nil when the command ended during the options.
    func parseOptions(_ argv: [String], _ spec: String, _ handle: (Character, String?) -> Bool) -> [String]? {
        let g = GetOpt(argv, spec)
        for item in g.items {
            switch item {
            case .error(let message):
                err(message)
                _ = usage(argv[0])
                return nil
            case .option(let c, let arg):
                if !handle(c, arg) { return nil }
            }
        }
        return g.operands
    }

    /// Parses the options of a request command, allowed by the getopt `spec`; a number or
    /// pattern that does not parse is reported where it stands, as in qemu-io.
    /// - Parameter sourceFile: `-s` names a source file (`write`) rather than a pattern
    ///   offset (`read`).
    /// - Returns: the arguments (with ``RequestArguments/inject`` set if `-i` ended the
    ///   options), or nil after printing why the command fails.
    func requestArguments(_ argv: [String], _ spec: String, sourceFile: Bool = false) -> RequestArguments? {
        var a = RequestArguments()
        let operands = parseOptions(argv, spec) { c, arg in
            switch c {
            case "b": a.vmstate = true
            case "c": a.compressed = true
            case "C": a.machine = true
            case "f": a.flags.insert(.fua)
            case "i":
                a.inject = true
                return false
            case "l":
                guard let n = number(arg ?? "") else { return false }
                a.patternLength = n
            case "n": a.zeroFlags.insert(.noFallback)
            case "P":
                guard let p = patternByte(arg ?? "") else { return false }
                a.pattern = p
            case "q": a.quiet = true
            case "s":
                if sourceFile {
                    a.sourceFile = arg
                } else {
                    guard let n = number(arg ?? "") else { return false }
                    a.patternOffset = n
                }
            case "u": a.zeroFlags.insert(.mayUnmap)
            case "v": a.verbose = true
            case "z": a.zero = true
            default: break // -p: accepted and ignored
            }
            return true
        }
        guard let operands else { return a.inject ? a : nil }
        a.operands = operands
        return a
    }

    /// The offset and the total length of a vectored request (`off len [len..]`), or nil
    /// after printing why they do not parse.
    func vectoredRange(_ operands: [String]) -> (offset: Int64, count: Int64)? {
        guard let offset = number(operands[0]), let count = vectorLength(Array(operands.dropFirst())) else { return nil }
        return (offset, count)
    }

    /// False after printing qemu-io's message when a request of `count` bytes (given as
    /// `given`) is longer than one request may be; `condition` is what would allow it.
    nonisolated func withinRequestLimit(_ count: Int64, given: String, condition: String = "") -> Bool {
        guard count > BlockRequestLimits.maxBytes else { return true }
        out("length cannot exceed \(BlockRequestLimits.maxBytes)\(condition), given \(given)\n")
        return false
    }

    /// False after printing qemu-io's message when `offset` or `count` is not a multiple of
    /// 512 (VM state and compressed requests).
    nonisolated func sectorAligned(offset: Int64, count: Int64) -> Bool {
        if offset % 512 != 0 {
            out("\(offset) is not a sector-aligned value for 'offset'\n")
            return false
        }
        if count % 512 != 0 {
            out("\(count) is not a sector-aligned value for 'count'\n")
            return false
        }
        return true
    }

    /// Runs one request and prints what qemu-io prints after it: "`failure` failed: <errno>",
    /// or (without `-q`) the report lines for `op` ("wrote", "discard").
    /// - Returns: false if the request failed.
    nonisolated func timedRequest(_ op: String, failure: String, offset: Int64, count: Int64, _ a: RequestArguments,
                                  _ request: @Sendable () async -> BlockError?) async -> Bool {
        let (error, report) = await QemuIOReport.timing(request)
        if let error {
            out("\(failure) failed: \(error.errnoText)\n")
            return false
        }
        if !a.quiet { out(report.lines(op, offset: offset, count: count, total: count, machine: a.machine)) }
        return true
    }
}
