#if canImport(Glibc)
import Glibc
#endif
import QBlockCore
import QBlockGraph

/// The `blkdebug` driver as the registry sees it: file names `blkdebug:CONFIG:IMAGE` (an
/// empty CONFIG for no config file), opening a ``BlkdebugNode`` above IMAGE.
public enum BlkdebugProtocol: PrefixedFilterDriver {
    /// `blkdebug`, as QEMU names the driver.
    public static let name = "blkdebug"
    /// `blkdebug:`.
    public static let filenamePrefix = "blkdebug:"

    /// Splits `blkdebug:CONFIG:IMAGE` into `config` (absent when empty) and the `image` child.
    /// - Throws: ``BlockError`` "blkdebug requires both config file and image path".
    public static func parseFilename(_ filename: String) throws -> PrefixedFilename {
        let rest = filename.dropFirst(filenamePrefix.count)
        guard let colon = rest.firstIndex(of: ":") else {
            throw BlockError(.invalidArgument, "blkdebug requires both config file and image path", path: filename, operation: "open")
        }
        var options = QObject.Dict()
        if colon != rest.startIndex { options["config"] = .string(String(rest[..<colon])) }
        return PrefixedFilename(options: options, children: [("image", String(rest[rest.index(after: colon)...]))])
    }

    /// Reads the config file the name gives and opens the filter above `children[0]`.
    /// - Throws: ``BlockError`` from reading or parsing the config file.
    public static func open(_ parsed: PrefixedFilename, children: [any BlockDriver], options: OpenOptions) async throws -> any BlockDriver {
        guard let image = children.first else {
            throw BlockError(.invalidArgument, "blkdebug needs an image", operation: "open")
        }
        var config: String?
        if case .string(let c)? = parsed.options["config"] { config = c }
        let rules = try config.map { try readConfigFile($0) } ?? []
        let node = try BlkdebugNode(image: image, rules: rules, configFile: config)
        await node.receiveDebugEvent(.none)   // QEMU reports `none` once, at open
        return node
    }

    /// Reads and parses the blkdebug config file at `path`.
    /// - Throws: ``BlockError`` "Could not read blkdebug config file: …" or a parse error.
    public static func readConfigFile(_ path: String) throws -> [BlkdebugRule] {
        let text: String
        do { text = try readTextFile(path) } catch let e as BlockError {
            throw BlockError(e.code, "Could not read blkdebug config file: \(e.message)", errno: e.errno, path: path, operation: "open")
        }
        return try BlkdebugConfig.parse(text, fileName: path)
    }

    /// The whole text of the file at `path`.
    private static func readTextFile(_ path: String) throws -> String {
        guard let f = fopen(path, "r") else { throw BlockError.system(errno, "open", path: path) }
        defer { fclose(f) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = chunk.withUnsafeMutableBytes { fread($0.baseAddress, 1, $0.count, f) }
            if n > 0 { bytes += chunk[0..<n] }
            if n < chunk.count { break }
        }
        if ferror(f) != 0 { throw BlockError.system(EIO, "read", path: path) }
        return String(decoding: bytes, as: UTF8.self)
    }
}
