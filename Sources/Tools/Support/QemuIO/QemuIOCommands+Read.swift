import QBlock
#if canImport(Glibc)
import Glibc
#endif

/// Reads `count` bytes at `offset` of `node` after checking the range.
private func performRead(_ node: any BlockDriver, offset: Int64, count: Int64) async -> Result<AlignedBuffer, BlockError> {
    do {
        try node.checkRequest(offset: offset, length: count, operation: "read")
        let buf = AlignedBuffer(count: Int(count))
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

private func dump(_ buf: AlignedBuffer, offset: Int64) -> String {
    buf.withUnsafeBytes { Pattern.hexDump($0, offset: offset) }
}

extension QemuIOSession {
    /// `read [-bCqv] [-P pattern [-s off] [-l len]] off len`
    func read(_ argv: [String]) async -> Bool {
        var machine = false, quiet = false, verbose = false, vmstate = false
        var pattern: UInt8?
        var patternOffset: Int64 = 0, patternCount: Int64 = 0
        var sflag = false, lflag = false
        let g = GetOpt(argv, "bCl:pP:qs:v")
        for item in g.items {
            switch item {
            case .error(let message):
                err(message)
                return usage("read")
            case .option(let c, let arg):
                switch c {
                case "b": vmstate = true
                case "C": machine = true
                case "l":
                    lflag = true
                    guard let n = number(arg ?? "") else { return false }
                    patternCount = n
                case "P":
                    guard let p = patternByte(arg ?? "") else { return false }
                    pattern = p
                case "q": quiet = true
                case "s":
                    sflag = true
                    guard let n = number(arg ?? "") else { return false }
                    patternOffset = n
                case "v": verbose = true
                default: break // -p: ignored
                }
            }
        }
        guard g.operands.count == 2 else { return usage("read") }
        guard let offset = number(g.operands[0]), let count = number(g.operands[1]) else { return false }
        if count > BlockRequestLimits.maxBytes {
            out("length cannot exceed \(BlockRequestLimits.maxBytes), given \(g.operands[1])\n")
            return false
        }
        if pattern == nil && (lflag || sflag) { return usage("read") }
        if !lflag { patternCount = count - patternOffset }
        if patternCount < 0 || patternCount + patternOffset > count {
            out("pattern verification range exceeds end of read data\n")
            return false
        }
        if vmstate {
            if offset % 512 != 0 {
                out("\(offset) is not a sector-aligned value for 'offset'\n")
                return false
            }
            if count % 512 != 0 {
                out("\(count) is not a sector-aligned value for 'count'\n")
                return false
            }
            out("read failed: \(BlockError.strerror(ENOTSUP))\n")
            return false
        }
        guard let node else { return false }
        let start = ContinuousClock.now
        let result = await performRead(node, offset: offset, count: count)
        let report = QemuIOReport(since: start)
        let buf: AlignedBuffer
        switch result {
        case .failure(let e):
            out("read failed: \(e.errnoText)\n")
            return false
        case .success(let b): buf = b
        }
        var text = ""
        var ok = true
        if let pattern, let failure = verify(buf, pattern: pattern, start: patternOffset, count: patternCount,
                                             reportOffset: offset + patternOffset) {
            text += failure
            ok = false
        }
        if !quiet {
            if verbose { text += dump(buf, offset: offset) }
            text += report.lines("read", offset: offset, count: count, total: count, machine: machine)
        }
        out(text)
        return ok
    }

    /// `readv [-Cqv] [-P pattern] off len [len..]`
    func readv(_ argv: [String]) async -> Bool {
        var machine = false, quiet = false, verbose = false
        var pattern: UInt8?
        let g = GetOpt(argv, "CP:qv")
        for item in g.items {
            switch item {
            case .error(let message):
                err(message)
                return usage("readv")
            case .option(let c, let arg):
                switch c {
                case "C": machine = true
                case "P":
                    guard let p = patternByte(arg ?? "") else { return false }
                    pattern = p
                case "q": quiet = true
                default: verbose = true
                }
            }
        }
        guard g.operands.count >= 2 else { return usage("readv") }
        guard let offset = number(g.operands[0]), let count = vectorLength(Array(g.operands.dropFirst())),
              let node else { return false }
        let start = ContinuousClock.now
        let result = await performRead(node, offset: offset, count: count)
        let report = QemuIOReport(since: start)
        guard case .success(let buf) = result else {
            if case .failure(let e) = result { out("readv failed: \(e.errnoText)\n") }
            return false
        }
        var text = ""
        var ok = true
        if let pattern, let failure = verify(buf, pattern: pattern, start: 0, count: count, reportOffset: offset) {
            text += failure
            ok = false
        }
        if !quiet {
            if verbose { text += dump(buf, offset: offset) }
            text += report.lines("read", offset: offset, count: count, total: count, machine: machine)
        }
        out(text)
        return ok
    }

    /// `aio_read [-Ciqv] [-P pattern] off len [len..]`: succeeds once submitted.
    func aioRead(_ argv: [String]) -> Bool {
        var machine = false, quiet = false, verbose = false
        var pattern: UInt8?
        let g = GetOpt(argv, "CP:iqv")
        for item in g.items {
            switch item {
            case .error(let message):
                err(message)
                return usage("aio_read")
            case .option(let c, let arg):
                switch c {
                case "C": machine = true
                case "P":
                    guard let p = patternByte(arg ?? "") else { return false }
                    pattern = p
                case "i":
                    out("injecting invalid read request\n")
                    return true
                case "q": quiet = true
                default: verbose = true
                }
            }
        }
        guard g.operands.count >= 2 else { return usage("aio_read") }
        guard let offset = number(g.operands[0]), let count = vectorLength(Array(g.operands.dropFirst())),
              let node else { return false }
        startAIO { [self, pattern, quiet, verbose, machine] in
            let start = ContinuousClock.now
            let result = await performRead(node, offset: offset, count: count)
            let report = QemuIOReport(since: start)
            switch result {
            case .failure(let e):
                out("readv failed: \(e.errnoText)\n")
            case .success(let buf):
                var text = ""
                if let pattern, let failure = verify(buf, pattern: pattern, start: 0, count: count, reportOffset: offset) {
                    text += failure
                }
                if !quiet {
                    if verbose { text += dump(buf, offset: offset) }
                    text += report.lines("read", offset: offset, count: count, total: count, machine: machine)
                }
                out(text)
            }
        }
        return true
    }
}
