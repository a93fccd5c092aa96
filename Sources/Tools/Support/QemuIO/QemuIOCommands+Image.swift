import QBlock

extension QemuIOSession {
    /// `flush`
    func flush() async -> Bool {
        guard let node else { return false }
        do {
            try await node.flush()
            return true
        } catch {
            out("flush failed: \(error.asBlockError.errnoText)\n")
            return false
        }
    }

    /// `length`: the virtual size, as "1 MiB".
    func length() -> Bool {
        guard let node else { return false }
        out(QemuNumbers.formatSize(Double(node.length)) + "\n")
        return true
    }

    /// `info`: format name, cluster size, VM state offset and format-specific information.
    func info() -> Bool {
        guard let node else { return false }
        var text = "format name: \(node.driverName)\n"
        // QEMU prints a protocol driver's name twice (its format and protocol names), and
        // stops there for a driver without image information (null, nbd).
        let name = node.driverName
        if ProtocolRegistry.driver(named: name) != nil || ProtocolRegistry.prefixed.contains(where: { $0.name == name }) {
            text += "format name: \(name)\n"
        }
        if ["null-co", "null-aio", "nbd"].contains(name) {
            out(text)
            return false
        }
        var clusterSize: Int64 = 0
        var vmStateOffset: Int64 = 0
        let reporting = node as? any FormatInfoReporting
        if let r = reporting {
            let i = r.driverInfo
            clusterSize = Int64(i.clusterSize)
            vmStateOffset = i.vmStateOffset
        }
        text += "cluster size: \(QemuNumbers.formatSize(Double(clusterSize)))\n"
        text += "vm state offset: \(QemuNumbers.formatSize(Double(vmStateOffset)))\n"
        if let r = reporting {
            text += "Format specific information:\n"
            for (label, value) in r.formatSpecificSummary { text += "    \(label): \(value)\n" }
        }
        out(text)
        return true
    }

    /// `map`: runs of allocated and unallocated bytes at the top node.
    func map() async -> Bool {
        guard let node else { return false }
        var offset: Int64 = 0
        var remaining = node.length
        while remaining > 0 {
            let run: (allocated: Bool, length: Int64)
            do {
                run = try await node.allocationRun(at: offset, length: remaining)
            } catch {
                report("Failed to get allocation status: \(error.asBlockError.errnoText)")
                return false
            }
            if run.length == 0 {
                report("Unexpected end of image")
                return false
            }
            let state = run.allocated ? "    allocated" : "not allocated"
            out("\(QemuNumbers.formatSize(Double(run.length))) (0x\(String(run.length, radix: 16))) bytes "
                        + "\(state) at offset \(QemuNumbers.formatSize(Double(offset))) (0x\(String(offset, radix: 16)))\n")
            offset += run.length
            remaining -= run.length
        }
        return true
    }

    /// `alloc offset [count]`: how many of `count` bytes (default 512) are allocated at the top node.
    func alloc(_ argv: [String]) async -> Bool {
        guard let node, let start = number(argv[1]) else { return false }
        var count: Int64 = 512
        if argv.count == 3 {
            guard let c = number(argv[2]) else { return false }
            count = c
        }
        var offset = start
        var remaining = count
        var allocated: Int64 = 0
        while remaining > 0 {
            let run: (allocated: Bool, length: Int64)
            do {
                run = try await node.allocation(at: offset, length: remaining)
            } catch {
                out("is_allocated failed: \(error.asBlockError.errnoText)\n")
                return false
            }
            offset += run.length
            remaining -= run.length
            if run.allocated { allocated += run.length }
            if run.length == 0 {
                count -= remaining
                remaining = 0
            }
        }
        out("\(allocated)/\(count) bytes allocated at offset \(QemuNumbers.formatSize(Double(start)))\n")
        return true
    }

    /// `truncate [-m prealloc_mode] off`
    func truncate(_ argv: [String]) async -> Bool {
        var prealloc = Preallocation.off
        let operands = parseOptions(argv, "m:") { _, arg in
            guard let p = Preallocation(rawValue: arg ?? "") else {
                report("Invalid preallocation mode '\(arg ?? "")'")
                return false
            }
            prealloc = p
            return true
        }
        guard let operands else { return false }
        guard operands.count == 1 else { return usage("truncate") }
        guard let size = number(operands[0]), let node else { return false }
        await waitForRequests()
        do {
            try await node.truncate(to: size, preallocation: prealloc)
            return true
        } catch {
            report(error.asBlockError.message)
            return false
        }
    }

    /// `open [-rsCnkU] [-t cache] [-d discard] [-i aio] [-f fmt] [-o options] path`
    func openCommand(_ argv: [String]) async -> Bool {
        var options = OpenOptions(cache: .writethrough)  // (qemu-io's default, as on its command line)
        var unmap = true
        var drive = QObject.Dict()
        var hasDriveOptions = false
        let operands = parseOptions(argv, "rsCnkUt:d:i:f:o:") { c, arg in
            switch c {
            case "r": options.readOnly = true
            case "s": options.snapshot = true
            case "C": options.copyOnRead = true
            case "n": options.cache = .none
            case "k": options.aio = .native
            case "U": options.forceShare = true
            case "t":
                guard let mode = CacheMode(qemuName: arg ?? "") else {
                    report("Invalid cache option: \(arg ?? "")")
                    return false
                }
                options.cache = mode
            case "d":
                guard let u = QemuIOSession.unmap(discardMode: arg ?? "") else {
                    report("Invalid discard option: \(arg ?? "")")
                    return false
                }
                unmap = u
            case "i":
                guard let mode = AIOMode(qemuName: arg ?? "") else {
                    report("Invalid aio option: \(arg ?? "")")
                    return false
                }
                options.aio = mode
            case "f": options.format = arg
            default:
                if imageOpts {
                    out("--image-opts and 'open -o' are mutually exclusive\n")
                    return false
                }
                do {
                    // (Repeated -o options add up, as QEMU's option list does.)
                    for (k, v) in try DriveOptions.parse(arg ?? "", warning: { self.report("warning: " + $0) }).entries { drive[k] = v }
                } catch {
                    report(error.asDriveMessage)
                    return false
                }
                hasDriveOptions = true
            }
            return true
        }
        guard var operands else { return false }
        if imageOpts && operands.count == 1 {
            do {
                drive = try DriveOptions.parse(operands.removeFirst(), warning: { self.report("warning: " + $0) })
            } catch {
                report(error.asDriveMessage)
                return false
            }
            hasDriveOptions = true
        }
        guard operands.count <= 1 else { return usage("open") }
        if operands.isEmpty && !hasDriveOptions {
            if node != nil {
                report("file open already, try 'help close'")
                return false
            }
            report("can't open: Must specify either driver or file")
            return false
        }
        return await open(operands.first, options: options, unmap: unmap, driveOptions: hasDriveOptions ? drive : nil)
    }
}
