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
                          flags: WriteFlags, misalignment: Int) async -> BlockError? {
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
            buf = AlignedBuffer(count: Int(count), misalignment: misalignment)
            if case .pattern(let p) = source { buf.withUnsafeMutableBytes { Pattern.fill($0, with: p) } }
        }
        try await buf.withUnsafeBytes { b in try await node.write(at: offset, from: b, flags: flags) }
        return nil
    } catch {
        return error.asBlockError
    }
}

/// A VM state write (`write -b`) or a compressed write (`write -c`) of `count` bytes.
private func performSpecialWrite(_ node: any BlockDriver, offset: Int64, count: Int64, source: WriteSource,
                                 vmstate: Bool, misalignment: Int) async -> BlockError? {
    do {
        let buf: AlignedBuffer
        switch source {
        case .buffer(let b): buf = b
        case .pattern(let p):
            buf = AlignedBuffer(count: Int(count), misalignment: misalignment)
            buf.withUnsafeMutableBytes { Pattern.fill($0, with: p) }
        case .zeroes: buf = AlignedBuffer(count: Int(count), misalignment: misalignment)
        }
        try await buf.withUnsafeBytes { b in
            if vmstate {
                try await node.saveVMState(at: offset, from: b)
            } else {
                try await node.checkedWriteCompressed(at: offset, from: b)
            }
        }
        return nil
    } catch {
        return error.asBlockError
    }
}

extension QemuIOSession {
    /// A buffer of `count` bytes filled with the contents of `path`, repeated as needed
    /// (qemu-io's `qemu_io_alloc_from_file`); nil after printing why not.
    private func loadSourceFile(_ path: String, count: Int64) -> AlignedBuffer? {
        let buf = AlignedBuffer(count: Int(count), misalignment: misalignment)
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
        guard let a = requestArguments(argv, "bcCfnpP:qs:uz", sourceFile: true) else { return false }
        guard a.operands.count == 2 else { return usage("write") }
        if a.vmstate && a.zero {
            out("-b and -z cannot be specified at the same time\n")
            return false
        }
        if a.zeroFlags.contains(.noFallback) && !a.zero {
            out("-n requires -z to be specified\n")
            return false
        }
        if a.zeroFlags.contains(.mayUnmap) && !a.zero {
            out("-u requires -z to be specified\n")
            return false
        }
        if [a.zero, a.pattern != nil, a.sourceFile != nil].filter({ $0 }).count > 1 {
            out("Only one of -z, -P, and -s can be specified at the same time\n")
            return false
        }
        guard let offset = number(a.operands[0]), let count = number(a.operands[1]), let node else { return false }
        if !a.zeroFlags.contains(.noFallback) {
            guard withinRequestLimit(count, given: a.operands[1], condition: " without -n") else { return false }
        }
        if a.vmstate || a.compressed {
            guard sectorAligned(offset: offset, count: count) else { return false }
        }
        var loaded: AlignedBuffer?
        if let sourceFile = a.sourceFile, !a.vmstate, !a.zero {
            guard let b = loadSourceFile(sourceFile, count: count) else { return false }
            loaded = b
        }
        let source: WriteSource = a.zero ? .zeroes(a.zeroFlags) : loaded.map { .buffer($0) } ?? .pattern(a.pattern ?? 0xcd)
        // VM state and compressed writes (qemu-io's do_save_vmstate, do_write_compressed).
        let special = a.vmstate || (a.compressed && !a.zero)
        return await timedRequest("wrote", failure: "write", offset: offset, count: count, a) {
            if special {
                return await performSpecialWrite(node, offset: offset, count: count, source: source,
                                                 vmstate: a.vmstate, misalignment: misalignment)
            }
            return await performWrite(node, offset: offset, count: count, source: source, flags: a.flags, misalignment: misalignment)
        }
    }

    /// `writev [-Cfq] [-P pattern] off len [len..]`
    func writev(_ argv: [String]) async -> Bool {
        guard let a = requestArguments(argv, "CfqP:") else { return false }
        guard a.operands.count >= 2 else { return usage("writev") }
        guard let (offset, count) = vectoredRange(a.operands), let node else { return false }
        return await timedRequest("wrote", failure: "writev", offset: offset, count: count, a) {
            await performWrite(node, offset: offset, count: count, source: .pattern(a.pattern ?? 0xcd), flags: a.flags, misalignment: misalignment)
        }
    }

    /// `aio_write [-Cfiquz] [-P pattern] off len [len..]`: succeeds once submitted.
    func aioWrite(_ argv: [String]) -> Bool {
        guard let a = requestArguments(argv, "CfiqP:uz") else { return false }
        if a.inject {
            out("injecting invalid write request\n")
            return true
        }
        guard a.operands.count >= 2 else { return usage("aio_write") }
        if a.zero && a.operands.count != 2 {
            out("-z supports only a single length parameter\n")
            return false
        }
        if a.zeroFlags.contains(.mayUnmap) && !a.zero {
            out("-u requires -z to be specified\n")
            return false
        }
        let range: (offset: Int64, count: Int64)?
        if a.zero {
            // A single length: parsed as a number, not a vector (qemu-io 7.2 also accepts -P
            // with -z and ignores the pattern).
            range = number(a.operands[0]).flatMap { o in number(a.operands[1]).map { (o, $0) } }
        } else {
            range = vectoredRange(a.operands)
        }
        guard let (offset, count) = range, let node else { return false }
        let source: WriteSource = a.zero ? .zeroes(a.zeroFlags) : .pattern(a.pattern ?? 0xcd)
        startAIO { [self] in
            _ = await timedRequest("wrote", failure: "aio_write", offset: offset, count: count, a) {
                await performWrite(node, offset: offset, count: count, source: source, flags: a.flags, misalignment: misalignment)
            }
        }
        return true
    }

    /// `discard [-Cq] off len`
    func discard(_ argv: [String]) async -> Bool {
        guard let a = requestArguments(argv, "Cq") else { return false }
        guard a.operands.count == 2 else { return usage("discard") }
        guard let offset = number(a.operands[0]), let count = number(a.operands[1]), let node else { return false }
        guard withinRequestLimit(count, given: a.operands[1]) else { return false }
        return await timedRequest("discard", failure: "discard", offset: offset, count: count, a) {
            do {
                // (Opened with discard=ignore: the request succeeds and changes nothing.)
                if await !self.unmap { try node.checkRequest(offset: offset, length: count, operation: "discard"); return nil }
                try await node.checkedDiscard(at: offset, length: count)
                return nil
            } catch {
                return error.asBlockError
            }
        }
    }
}
