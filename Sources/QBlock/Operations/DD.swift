#if canImport(Glibc)
import Glibc
#endif
import QBlockCore
import QBlockDrivers
import QBlockGraph
import QBlockOpen

/// Operands of `qemu-img dd`.
public struct DDOptions: Sendable {
    /// The input image (`if=`); required.
    public var input: String?
    /// The output image (`of=`), created by the copy; required.
    public var output: String?
    /// Block size (`bs=`, default 512).
    public var blockSize: Int64 = 512
    /// Blocks to copy (`count=`), all when nil.
    public var count: Int64?
    /// Blocks of the input to skip (`skip=`).
    public var skip: Int64?
    /// Input format (`-f`), probed when nil.
    public var inputFormat: String?
    /// Output format (`-O`).
    public var outputFormat = "raw"
    /// Open the input shared (`-U`).
    public var forceShare = false

    /// Creates qemu-img dd's defaults (512-byte blocks, the whole input, raw output).
    public init() {}

    /// Parses one `key=value` operand as qemu-img dd does.
    /// - Throws: ``BlockError`` with qemu-img's message.
    public mutating func parseOperand(_ arg: String) throws {
        guard let eq = arg.firstIndex(of: "=") else {
            throw BlockError(.invalidArgument, "unrecognized operand \(arg)")
        }
        let name = String(arg[..<eq])
        let key = String(arg[..<eq]), value = String(arg[arg.index(after: eq)...])
        func number(_ what: String, min: Int64 = 0, max: Int64 = Int64.max) throws -> Int64 {
            guard let v = SizeParser.parse(value) else {
                throw BlockError(.invalidArgument, "Invalid \(what) specified. You may use k, M, G, T, P or E suffixes for\nkilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.")
            }
            guard v >= min && v <= max else {
                throw BlockError(.invalidArgument, "Invalid \(what) specified. Must be between \(min) and \(max).")
            }
            return v
        }
        switch key {
        case "bs": blockSize = try number("bs", min: 1, max: Int64(Int32.max))
        case "count": count = try number("count")
        case "skip": skip = try number("skip")
        case "if": input = value
        case "of": output = value
        default: throw BlockError(.invalidArgument, "unrecognized operand \(name)")
        }
    }
}

/// `qemu-img dd`: copies (part of) an image into a newly created one, block by block.
public enum DD {
    /// Runs the copy.
    /// - Parameter warn: receives qemu-img's non-fatal messages ("cannot skip to specified offset").
    /// - Throws: ``BlockError`` with qemu-img's message.
    public static func run(_ o: DDOptions, warn: (String) -> Void = { _ in }) async throws {
        guard let inPath = o.input, let outPath = o.output else {
            throw BlockError(.invalidArgument, "Must specify both input and output files")
        }
        let input: any BlockDriver
        do {
            input = try await ImageOpener.open(inPath, options: OpenOptions(format: o.inputFormat, readOnly: true,
                                                                            forceShare: o.forceShare))
        } catch {
            throw Convert.openError(error, inPath)
        }
        do {
            try await copy(o, input: input, inPath: inPath, outPath: outPath, warn: warn)
        } catch {
            try? await input.close()
            throw error
        }
        try? await input.close()
    }

    private static func copy(_ o: DDOptions, input: any BlockDriver, inPath: String, outPath: String,
                             warn: (String) -> Void) async throws {
        guard ImageCreator.formats.contains(o.outputFormat) else {
            throw BlockError(.invalidArgument, "Unknown file format")
        }
        let bs = o.blockSize
        var size = qemuLength(input)
        if let count = o.count, count <= Int64.max / bs, count * bs < size { size = count * bs }
        let skip = o.skip ?? 0
        let skipBeyond = o.skip != nil && (skip > Int64.max / bs || size < bs * skip)
        let outSize = skipBeyond ? 0 : size - bs * skip
        do {
            // (Creation rounds the size up to whole sectors, as QEMU's does.)
            try await ImageCreator.create(format: o.outputFormat, path: outPath, size: outSize)
        } catch {
            throw BlockError(error.asBlockError.code, "\(outPath): error while creating output image: \(error.asBlockError.message)")
        }
        let output: any BlockDriver
        do {
            output = try await ImageOpener.open(outPath, options: OpenOptions(format: o.outputFormat, readOnly: false))
        } catch {
            throw Convert.openError(error, outPath)
        }
        var inPos: Int64
        if skipBeyond {
            warn("\(inPath): cannot skip to specified offset")
            inPos = size
        } else {
            inPos = skip * bs
        }
        let buf = AlignedBuffer(count: Int(bs))
        var outPos: Int64 = 0
        do {
            while inPos < size {
                let n = Int(min(bs, size - inPos))
                let part = UnsafeMutableRawBufferPointer(start: buf.unsafeBase, count: n)
                do {
                    let readable = Int(max(0, min(Int64(n), input.length - inPos)))
                    if readable > 0 {
                        try await input.read(at: inPos, into: UnsafeMutableRawBufferPointer(rebasing: part[0..<readable]))
                    }
                    if readable < n { memset(buf.unsafeBase + readable, 0, n - readable) }
                } catch {
                    throw BlockError(.io, "error while reading from input image file: \(BlockError.strerror(error.asBlockError.errnoValue))")
                }
                inPos += Int64(n)
                do {
                    try await output.write(at: outPos, from: UnsafeRawBufferPointer(part), flags: [])
                } catch {
                    throw BlockError(.io, "error while writing to output image file: \(BlockError.strerror(error.asBlockError.errnoValue))")
                }
                outPos += Int64(n)
            }
            try await output.close()
        } catch {
            try? await output.close()
            throw error
        }
    }
}

