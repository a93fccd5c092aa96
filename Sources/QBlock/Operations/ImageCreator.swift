import QBlockCore
import QBlockDrivers
import QBlockGraph
import QBlockOpen
/// Creates images the way `qemu-img create` does: the same option syntax (`-o key=value,...`),
/// the same checks in the same order and the same messages.
///
/// Creation is two steps so that a caller can print the "Formatting" line between them, as
/// qemu-img does (driver-level errors come after that line): ``prepare(format:path:size:options:backingFile:backingFormat:openBacking:)``
/// checks everything qemu-img checks before printing it, and ``execute(_:)`` writes the image.
/// ``create(format:path:size:options:backingFile:backingFormat:)`` does both.
public enum ImageCreator {
    /// Formats this library can create (every registered format).
    public static var formats: [String] { FormatRegistry.names }

    /// A checked creation request.
    public struct Plan: Sendable {
        /// The format to create (a name from ``ImageCreator/formats``).
        public var format: String
        /// The new image file.
        public var path: String
        /// The virtual size in bytes.
        public var size: Int64
        /// The effective option values by name, as given (sizes and numbers normalized).
        public var values: [String: String]
    }

    /// Splits a qemu-img option string (`a=1,b=2`, with `,,` for a literal comma) into pairs.
    /// A bare `name` means `name=on`, a bare `noname` means `name=off`, as QEMU reads them.
    public static func parseOptionString(_ s: String) -> [(String, String)] {
        var parts: [String] = []
        var cur = ""
        var chars = Array(s)[...]
        while let c = chars.popFirst() {
            if c == "," {
                if chars.first == "," { cur.append(","); chars = chars.dropFirst(); continue }
                parts.append(cur); cur = ""
            } else {
                cur.append(c)
            }
        }
        parts.append(cur)
        return parts.filter { !$0.isEmpty }.map { p in
            if let eq = p.firstIndex(of: "=") { return (String(p[..<eq]), String(p[p.index(after: eq)...])) }
            if p.hasPrefix("no") { return (String(p.dropFirst(2)), "off") }
            return (p, "on")
        }
    }

    static let sizeHint = "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively."

    /// Checks a creation request as qemu-img does before it prints "Formatting ...".
    /// - Parameters:
    ///   - size: the size argument, or nil when none was given (then `-o size=` or the
    ///     backing file's size is used).
    ///   - options: the `-o` pairs in command-line order (later ones win).
    ///   - openBacking: false for `-u`: the backing file is not opened (a size is then needed).
    /// - Throws: ``BlockError`` worded as qemu-img's message after "qemu-img: FILE: ".
    public static func prepare(format: String, path: String, size: Int64?, options: [(String, String)],
                               backingFile: String?, backingFormat: String?, openBacking: Bool = true) async throws -> Plan {
        guard let table = FormatRegistry.driver(named: format)?.createOptions else {
            throw ImageOpener.creationRefusal(format: format, path: path)
        }
        let proto = ProtocolRegistry.driver(forFilename: path).name
        guard let protocolOptions = protocolCreateOptions(proto) else {
            throw BlockError(.unsupported, "Protocol driver '\(proto)' does not support image creation", path: path, operation: "create")
        }
        var values: [String: String] = [:]
        for (key, value) in options {
            // (An option of the host file is the target protocol's to take.)
            guard let desc = table.first(where: { $0.name == key }),
                  !desc.protocolLevel || protocolOptions.contains(where: { $0.name == key }) else {
                throw BlockError(.invalidArgument, "Invalid parameter '\(key)'", path: path, operation: "create")
            }
            switch desc.type {
            case .size:
                guard let v = SizeParser.parse(value) else {
                    throw BlockError(.invalidArgument, "Parameter '\(key)' expects a non-negative number below 2^64\n" + sizeHint,
                                     path: path, operation: "create")
                }
                values[key] = String(v)
            case .number:
                guard let v = UInt64(value) else {
                    throw BlockError(.invalidArgument, "Parameter '\(key)' expects a number", path: path, operation: "create")
                }
                values[key] = String(v)
            case .bool:
                guard CreateOption.parseBool(value) != nil else {
                    throw BlockError(.invalidArgument, "Parameter '\(key)' expects 'on' or 'off'", path: path, operation: "create")
                }
                values[key] = value
            case .string:
                values[key] = value
            }
        }
        if values["size"] != nil {
            if size != nil {
                throw BlockError(.invalidArgument, "The image size must be specified only once", path: path, operation: "create")
            }
        } else if let size {
            values["size"] = String(size)
        }
        if let backingFile {
            guard table.contains(where: { $0.name == "backing_file" }) else {
                throw BlockError(.invalidArgument, "Backing file not supported for file format '\(format)'", path: path, operation: "create")
            }
            values["backing_file"] = backingFile
        }
        if let backingFormat {
            guard table.contains(where: { $0.name == "backing_fmt" }) else {
                throw BlockError(.invalidArgument, "Backing file format not supported for file format '\(format)'",
                                 path: path, operation: "create")
            }
            values["backing_fmt"] = backingFormat
        }
        let backing = values["backing_file"]
        let backingFmt = values["backing_fmt"]
        if let backing {
            if backing == path {
                throw BlockError(.invalidArgument, "Error: Trying to create an image with the same filename as the backing file",
                                 path: path, operation: "create")
            }
            if backing.isEmpty {
                throw BlockError(.invalidArgument, "Expected backing file name, got empty string", path: path, operation: "create")
            }
        }
        if let backing, openBacking {
            let full = ImageOpener.resolveBackingPath(backing, relativeTo: path)
            let node: any BlockDriver
            do {
                node = try await ImageOpener.open(full, options: OpenOptions(format: backingFmt, readOnly: true, forceShare: true))
            } catch {
                let e = error.asBlockError
                // QEMU names the file only when the file itself could not be opened.
                var why = e.message
                let prefix = "Could not open '\(full)': "
                if why.hasPrefix(prefix) && !(e.errno != nil && e.operation == "open") { why = String(why.dropFirst(prefix.count)) }
                throw BlockError(e.code, why + "\nCould not open backing image.", errno: e.errno, path: full, operation: "open backing")
            }
            let detected = node.driverName
            let backingLength = qemuLength(node)
            try? await node.close()
            guard backingFmt != nil else {
                throw BlockError(.invalidArgument, "Backing file specified without backing format\nDetected format of \(detected).",
                                 path: path, operation: "create")
            }
            if values["size"] == nil { values["size"] = String(backingLength) }
        } else if backing != nil && backingFmt == nil {
            throw BlockError(.invalidArgument, "Backing file specified without backing format", path: path, operation: "create")
        }
        guard let sizeText = values["size"], let finalSize = Int64(sizeText) else {
            throw BlockError(.invalidArgument, "Image creation needs a size parameter", path: path, operation: "create")
        }
        return Plan(format: format, path: path, size: finalSize, values: values)
    }

    /// Writes the image a ``Plan`` describes.
    /// - Throws: ``BlockError`` worded as qemu-img's message after "qemu-img: FILE: ".
    public static func execute(_ plan: Plan) async throws {
        guard let driver = FormatRegistry.driver(named: plan.format) else {
            throw BlockError(.invalidArgument, "Unknown file format '\(plan.format)'", path: plan.path, operation: "create")
        }
        // The driver parses on/off; the other spellings QEMU accepts are normalized here.
        var options: [(String, String)] = []
        for desc in driver.createOptions {
            guard let v = plan.values[desc.name], desc.name != "size" else { continue }
            options.append((desc.name, desc.type == .bool ? (CreateOption.parseBool(v) == true ? "on" : "off") : v))
        }
        let proto = ProtocolRegistry.driver(forFilename: plan.path).name
        if proto != "file" {
            try await createOnExistingNode(plan, driver: driver, protocolName: proto, options: options)
            return
        }
        try await driver.create(path: ProtocolRegistry.strippingFilePrefix(plan.path), size: plan.size, options: options)
    }

    /// Creates the image of `plan` on a protocol node that cannot create images but may
    /// exist (an NBD export), as QEMU's `bdrv_co_create_opts_simple`: the node is opened
    /// read-write, must be at least as large as the format asks (it is not grown), its first
    /// sector is cleared, then the format writes its image on it.
    private static func createOnExistingNode(_ plan: Plan, driver: any FormatDriver.Type, protocolName: String,
                                             options: [(String, String)]) async throws {
        guard let accepted = protocolCreateOptions(protocolName),
              let format = driver as? any ExistingNodeCreatable.Type else {
            throw BlockError(.unsupported, "Driver '\(protocolName)' does not support image creation", path: plan.path, operation: "create")
        }
        // The options the format leaves to the protocol must be the protocol's.
        for (key, _) in options {
            if let desc = driver.createOptions.first(where: { $0.name == key }), desc.protocolLevel,
               !accepted.contains(where: { $0.name == key }) {
                throw BlockError(.invalidArgument, "Invalid parameter '\(key)'", path: plan.path, operation: "create")
            }
        }
        let request = format.protocolRequest(size: plan.size, options: options)
        if let p = request.preallocation, p != "off" {
            throw BlockError(.unsupported, "Unsupported preallocation mode '\(p)'", path: plan.path, operation: "create")
        }
        let node: any BlockDriver
        do {
            node = try await ProtocolRegistry.openNode(filename: plan.path, options: OpenOptions(readOnly: false, locking: false))
        } catch {
            let e = error.asBlockError
            throw BlockError(e.code, "Protocol driver '\(protocolName)' does not support image creation, and opening the image failed: \(e.message)",
                             errno: e.errno, path: plan.path, operation: "create", underlying: e)
        }
        do {
            if node.length < request.minimumSize {
                // (Growing it is the node's to refuse: "Cannot grow NBD nodes".)
                try await node.truncate(to: request.minimumSize, preallocation: .off)
                if node.length < request.minimumSize {
                    throw BlockError(.unsupported, "Could not resize image to \(request.minimumSize) bytes", path: plan.path, operation: "create")
                }
            }
            let clear = min(node.length, 512)
            if clear > 0 {
                do {
                    try await node.writeZeroes(at: 0, length: clear, flags: [.mayUnmap])
                } catch {
                    let e = error.asBlockError
                    let reason = e.errno.map { BlockError.strerror($0) } ?? e.message
                    throw BlockError(e.code, "Failed to clear the new image's first sector: \(reason)", errno: e.errno,
                                     path: plan.path, operation: "create", underlying: e)
                }
            }
            try await format.create(on: node, size: plan.size, options: options)
            try await node.flush()
        } catch {
            try? await node.close()
            throw error
        }
        try await node.close()
    }

    /// Checks and creates an image in one call (nothing printed).
    public static func create(format: String, path: String, size: Int64?, options: [(String, String)] = [],
                              backingFile: String? = nil, backingFormat: String? = nil) async throws {
        let plan = try await prepare(format: format, path: path, size: size, options: options,
                                     backingFile: backingFile, backingFormat: backingFormat)
        try await execute(plan)
    }
}

/// A node's size as QEMU reports it: in whole 512-byte sectors, rounded up.
public func qemuLength(_ node: any BlockDriver) -> Int64 {
    (node.length + 511) / 512 * 512
}
