import QBlock
#if canImport(Glibc)
import Glibc
#endif

/// Reads `count` bytes at `offset` of `node` after checking the range.
/// With `vmstate`, reads VM state (`read -b`) instead.
private func performRead(_ node: any BlockDriver, offset: Int64, count: Int64, misalignment: Int,
                         vmstate: Bool = false) async -> Result<AlignedBuffer, BlockError> {
    do {
        if vmstate {
            let buf = AlignedBuffer(count: Int(count), misalignment: misalignment)
            try await buf.withUnsafeMutableBytes { b in try await node.loadVMState(at: offset, into: b) }
            return .success(buf)
        }
        try node.checkRequest(offset: offset, length: count, operation: "read")
        let buf = AlignedBuffer(count: Int(count), misalignment: misalignment)
        try await buf.withUnsafeMutableBytes { b in try await node.read(at: offset, into: b) }
        return .success(buf)
    } catch {
        return .failure(error.asBlockError)
    }
}

/// "Pattern verification failed ..." if `count` bytes at `start` of `buf` are not all `pattern`.
private func verify(_ buf: AlignedBuffer, pattern: UInt8, start: Int64, count: Int64, reportOffset: Int64) -> String? {
    let ok = buf.withUnsafeBytes { b in
        Pattern.matches(UnsafeRawBufferPointer(rebasing: b[Int(start)..<Int(start + count)]), byte: pattern)
    }
    return ok ? nil : "Pattern verification failed at offset \(reportOffset), \(count) bytes\n"
}

extension QemuIOSession {
    /// `read [-bCqv] [-P pattern [-s off] [-l len]] off len`
    func read(_ argv: [String]) async -> Bool {
        guard let a = requestArguments(argv, "bCl:pP:qs:v") else { return false }
        guard a.operands.count == 2 else { return usage("read") }
        guard let offset = number(a.operands[0]), let count = number(a.operands[1]) else { return false }
        guard withinRequestLimit(count, given: a.operands[1]) else { return false }
        if a.pattern == nil && (a.patternLength != nil || a.patternOffset != nil) { return usage("read") }
        let patternOffset = a.patternOffset ?? 0
        let patternCount = a.patternLength ?? count - patternOffset
        if patternCount < 0 || patternCount + patternOffset > count {
            out("pattern verification range exceeds end of read data\n")
            return false
        }
        if a.vmstate {
            guard sectorAligned(offset: offset, count: count) else { return false }
        }
        guard let node else { return false }
        if a.vmstate {
            return await readAndReport(node, offset: offset, count: count, checking: (patternOffset, patternCount), a,
                                       failure: "read", vmstate: true)
        }
        return await readAndReport(node, offset: offset, count: count, checking: (patternOffset, patternCount), a,
                                   failure: "read")
    }

    /// `readv [-Cqv] [-P pattern] off len [len..]`
    func readv(_ argv: [String]) async -> Bool {
        guard let a = requestArguments(argv, "CP:qv") else { return false }
        guard a.operands.count >= 2 else { return usage("readv") }
        guard let (offset, count) = vectoredRange(a.operands), let node else { return false }
        return await readAndReport(node, offset: offset, count: count, checking: (0, count), a, failure: "readv")
    }

    /// `aio_read [-Ciqv] [-P pattern] off len [len..]`: succeeds once submitted.
    func aioRead(_ argv: [String]) -> Bool {
        guard let a = requestArguments(argv, "CP:iqv") else { return false }
        if a.inject {
            out("injecting invalid read request\n")
            return true
        }
        guard a.operands.count >= 2 else { return usage("aio_read") }
        guard let (offset, count) = vectoredRange(a.operands), let node else { return false }
        startAIO { [self] in
            _ = await readAndReport(node, offset: offset, count: count, checking: (0, count), a, failure: "readv")
        }
        return true
    }

    /// Reads `count` bytes at `offset` and prints what qemu-io prints after a read:
    /// "`failure` failed: <errno>", or a pattern mismatch in the bytes `checking` covers
    /// (with `-P`) and, without `-q`, the dump (`-v`) and the report lines.
    /// - Returns: false if the read failed or the pattern did not match.
    private nonisolated func readAndReport(_ node: any BlockDriver, offset: Int64, count: Int64,
                                           checking: (start: Int64, count: Int64), _ a: RequestArguments,
                                           failure: String, vmstate: Bool = false) async -> Bool {
        let (result, report) = await QemuIOReport.timing {
            await performRead(node, offset: offset, count: count, misalignment: misalignment, vmstate: vmstate)
        }
        let buf: AlignedBuffer
        switch result {
        case .failure(let e):
            out("\(failure) failed: \(e.errnoText)\n")
            return false
        case .success(let b): buf = b
        }
        var text = ""
        var ok = true
        if let pattern = a.pattern, let mismatch = verify(buf, pattern: pattern, start: checking.start, count: checking.count,
                                                          reportOffset: offset + checking.start) {
            text += mismatch
            ok = false
        }
        if !a.quiet {
            if a.verbose { text += buf.withUnsafeBytes { Pattern.hexDump($0, offset: offset) } }
            text += report.lines("read", offset: offset, count: count, total: count, machine: a.machine)
        }
        out(text)
        return ok
    }
}
