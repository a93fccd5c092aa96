import QBlock
#if canImport(Glibc)
import Glibc
#endif

/// How a write request gets its data.
private enum WriteSource {
    case pattern(UInt8)
    case zeroes(WriteFlags)
    /// Data prepared beforehand (`write -s FILE`).
    case buffer(AlignedBuffer)
}

/// Writes `count` bytes at `offset` of `node` after checking the range.
private func performWrite(_ node: any BlockDriver, offset: Int64, count: Int64, source: WriteSource,
                          flags: WriteFlags) async -> BlockError? {
    do {
        if case .zeroes(let zflags) = source {
            try await node.checkedWriteZeroes(at: offset, length: count, flags: zflags.union(flags))
            return nil
        }
        try node.checkRequest(offset: offset, length: count, operation: "write")
        let buf: AlignedBuffer
        if case .buffer(let b) = source {
            buf = b
        } else {
            buf = AlignedBuffer(count: Int(count))
            if case .pattern(let p) = source { buf.withUnsafeMutableBytes { Pattern.fill($0, with: p) } }
        }
        try await buf.withUnsafeBytes { b in try await node.write(at: offset, from: b, flags: flags) }
        return nil
    } catch {
        return error.asBlockError
    }
}

extension QemuIOSession {
    /// A buffer of `count` bytes filled with the contents of `path`, repeated as needed
    /// (qemu-io's `qemu_io_alloc_from_file`); nil after printing why not.
    private func loadSourceFile(_ path: String, count: Int64) -> AlignedBuffer? {
        let buf = AlignedBuffer(count: Int(count))
        do {
            guard let f = fopen(path, "r") else {
                err("\(path): \(BlockError.strerror(errno))")
                return nil
            }
            defer { fclose(f) }
            let n = buf.withUnsafeMutableBytes { b in b.baseAddress.map { fread($0, 1, b.count, f) } ?? 0 }
            if ferror(f) != 0 {
                err("\(path): \(BlockError.strerror(errno))")
                return nil
            }
            if n == 0 && count > 0 {
                err("\(path): file is empty")
                return nil
            }
            buf.withUnsafeMutableBytes { b in
                var pos = n
                while pos < b.count {
                    let len = min(n, b.count - pos)
                    UnsafeMutableRawBufferPointer(rebasing: b[pos..<pos + len])
                        .copyMemory(from: UnsafeRawBufferPointer(rebasing: b[0..<len]))
                    pos += len
                }
            }
        }
        return buf
    }

    /// `write [-bcCfnquz] [-P pattern | -s source_file] off len`
    func write(_ argv: [String]) async -> Bool {
        var machine = false, quiet = false, vmstate = false, compressed = false, zero = false
        var flags: WriteFlags = []
        var zeroFlags: WriteFlags = []
        var pattern: UInt8?
        var sourceFile: String?
        let g = GetOpt(argv, "bcCfnpP:qs:uz")
        for item in g.items {
            switch item {
            case .error(let message):
                err(message)
                return usage("write")
            case .option(let c, let arg):
                switch c {
                case "b": vmstate = true
                case "c": compressed = true
                case "C": machine = true
                case "f": flags.insert(.fua)
                case "n": zeroFlags.insert(.noFallback)
                case "P":
                    guard let p = patternByte(arg ?? "") else { return false }
                    pattern = p
                case "q": quiet = true
                case "s": sourceFile = arg
                case "u": zeroFlags.insert(.mayUnmap)
                case "z": zero = true
                default: break // -p: ignored
                }
            }
        }
        guard g.operands.count == 2 else { return usage("write") }
        if vmstate && zero {
            out("-b and -z cannot be specified at the same time\n")
            return false
        }
        if zeroFlags.contains(.noFallback) && !zero {
            out("-n requires -z to be specified\n")
            return false
        }
        if zeroFlags.contains(.mayUnmap) && !zero {
            out("-u requires -z to be specified\n")
            return false
        }
        if [zero, pattern != nil, sourceFile != nil].filter({ $0 }).count > 1 {
            out("Only one of -z, -P, and -s can be specified at the same time\n")
            return false
        }
        guard let offset = number(g.operands[0]), let count = number(g.operands[1]), let node else { return false }
        if count > BlockRequestLimits.maxBytes && !zeroFlags.contains(.noFallback) {
            out("length cannot exceed \(BlockRequestLimits.maxBytes) without -n, given \(g.operands[1])\n")
            return false
        }
        if vmstate || compressed {
            if offset % 512 != 0 {
                out("\(offset) is not a sector-aligned value for 'offset'\n")
                return false
            }
            if count % 512 != 0 {
                out("\(count) is not a sector-aligned value for 'count'\n")
                return false
            }
        }
        var loaded: AlignedBuffer?
        if let sourceFile, !vmstate, !zero {
            guard let b = loadSourceFile(sourceFile, count: count) else { return false }
            loaded = b
        }
        let start = ContinuousClock.now
        let failure: BlockError?
        if vmstate || (compressed && !zero) {
            // No node of this library writes VM state or compressed clusters through this interface.
            failure = BlockError(.unsupported, "Operation not supported", errno: ENOTSUP)
        } else {
            let source: WriteSource = zero ? .zeroes(zeroFlags)
                : loaded.map { .buffer($0) } ?? .pattern(pattern ?? 0xcd)
            failure = await performWrite(node, offset: offset, count: count, source: source, flags: flags)
        }
        let report = QemuIOReport(since: start)
        if let failure {
            out("write failed: \(failure.errnoText)\n")
            return false
        }
        if !quiet {
            out(report.lines("wrote", offset: offset, count: count, total: count, machine: machine))
        }
        return true
    }

    /// `writev [-Cfq] [-P pattern] off len [len..]`
    func writev(_ argv: [String]) async -> Bool {
        var machine = false, quiet = false
        var flags: WriteFlags = []
        var pattern: UInt8 = 0xcd
        let g = GetOpt(argv, "CfqP:")
        for item in g.items {
            switch item {
            case .error(let message):
                err(message)
                return usage("writev")
            case .option(let c, let arg):
                switch c {
                case "C": machine = true
                case "f": flags.insert(.fua)
                case "P":
                    guard let p = patternByte(arg ?? "") else { return false }
                    pattern = p
                default: quiet = true
                }
            }
        }
        guard g.operands.count >= 2 else { return usage("writev") }
        guard let offset = number(g.operands[0]), let count = vectorLength(Array(g.operands.dropFirst())),
              let node else { return false }
        let start = ContinuousClock.now
        let failure = await performWrite(node, offset: offset, count: count, source: .pattern(pattern), flags: flags)
        let report = QemuIOReport(since: start)
        if let failure {
            out("writev failed: \(failure.errnoText)\n")
            return false
        }
        if !quiet {
            out(report.lines("wrote", offset: offset, count: count, total: count, machine: machine))
        }
        return true
    }

    /// `aio_write [-Cfiquz] [-P pattern] off len [len..]`: succeeds once submitted.
    func aioWrite(_ argv: [String]) -> Bool {
        var machine = false, quiet = false, zero = false
        var flags: WriteFlags = []
        var zeroFlags: WriteFlags = []
        var pattern: UInt8 = 0xcd
        var patternGiven = false
        let g = GetOpt(argv, "CfiqP:uz")
        for item in g.items {
            switch item {
            case .error(let message):
                err(message)
                return usage("aio_write")
            case .option(let c, let arg):
                switch c {
                case "C": machine = true
                case "f": flags.insert(.fua)
                case "i":
                    out("injecting invalid write request\n")
                    return true
                case "P":
                    guard let p = patternByte(arg ?? "") else { return false }
                    pattern = p
                    patternGiven = true
                case "q": quiet = true
                case "u": zeroFlags.insert(.mayUnmap)
                default: zero = true
                }
            }
        }
        _ = patternGiven // qemu-io 7.2 accepts -z with -P and ignores the pattern
        guard g.operands.count >= 2 else { return usage("aio_write") }
        if zero && g.operands.count != 2 {
            out("-z supports only a single length parameter\n")
            return false
        }
        if zeroFlags.contains(.mayUnmap) && !zero {
            out("-u requires -z to be specified\n")
            return false
        }
        guard let offset = number(g.operands[0]) else { return false }
        let count: Int64
        if zero {
            guard let n = number(g.operands[1]) else { return false }
            count = n
        } else {
            guard let n = vectorLength(Array(g.operands.dropFirst())) else { return false }
            count = n
        }
        guard let node else { return false }
        let source: WriteSource = zero ? .zeroes(zeroFlags) : .pattern(pattern)
        startAIO { [self, flags, quiet, machine] in
            let start = ContinuousClock.now
            let failure = await performWrite(node, offset: offset, count: count, source: source, flags: flags)
            let report = QemuIOReport(since: start)
            if let failure {
                out("aio_write failed: \(failure.errnoText)\n")
            } else if !quiet {
                out(report.lines("wrote", offset: offset, count: count, total: count, machine: machine))
            }
        }
        return true
    }

    /// `discard [-Cq] off len`
    func discard(_ argv: [String]) async -> Bool {
        var machine = false, quiet = false
        let g = GetOpt(argv, "Cq")
        for item in g.items {
            switch item {
            case .error(let message):
                err(message)
                return usage("discard")
            case .option(let c, _):
                if c == "C" { machine = true } else { quiet = true }
            }
        }
        guard g.operands.count == 2 else { return usage("discard") }
        guard let offset = number(g.operands[0]), let count = number(g.operands[1]), let node else { return false }
        if count > BlockRequestLimits.maxBytes {
            out("length cannot exceed \(BlockRequestLimits.maxBytes), given \(g.operands[1])\n")
            return false
        }
        let start = ContinuousClock.now
        do {
            try await node.checkedDiscard(at: offset, length: count)
        } catch {
            out("discard failed: \(error.asBlockError.errnoText)\n")
            return false
        }
        let report = QemuIOReport(since: start)
        if !quiet {
            out(report.lines("discard", offset: offset, count: count, total: count, machine: machine))
        }
        return true
    }
}
