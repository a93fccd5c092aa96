import QBlockCore
import QBlockGraph

/// What `null-co` and `null-aio` share: everything but the name (QEMU's two differ in how
/// they complete requests, which makes no difference here). Each takes the file name
/// `NAME://` and nothing else, or `blockdev-add` with `size`, `latency-ns` and `read-zeroes`.
public protocol NullProtocolDriver: ProtocolDriver {}

extension NullProtocolDriver {
    /// The driver's name: `null-co://`, `null-aio://`.
    public static var uriSchemes: [String] { [name] }
    /// "null open".
    public static var openOperation: String { "null open" }

    /// A 1 GiB node that drops writes (see ``NullNode``).
    /// - Throws: ``BlockError`` "The only allowed filename for this driver is 'NAME://'".
    public static func open(filename: String, options: OpenOptions) async throws -> any BlockDriver {
        try NullOptions.open(name, filename: filename, options: options)
    }

    /// Reads `size`, `latency-ns` and `read-zeroes`.
    /// - Throws: the reader's errors; ``BlockError`` "latency-ns is invalid".
    public static func readBlockdevOptions(_ members: any DriverOptionReader) throws -> ProtocolOpener {
        try NullOptions.read(name, members)
    }

    /// `{"driver": NAME}`.
    /// - Throws: ``BlockError`` for a name other than `NAME://`.
    public static func blockdevOptions(filename: String) throws -> QObject.Dict {
        try NullOptions.blockdevOptions(name, filename: filename)
    }
}

/// The `null-co` protocol driver (``NullNode``).
public enum NullCoProtocol: NullProtocolDriver {
    /// `null-co`.
    public static let name = "null-co"
}

/// The `null-aio` protocol driver: `null-co` under another name.
public enum NullAioProtocol: NullProtocolDriver {
    /// `null-aio`.
    public static let name = "null-aio"
}

/// What the two null drivers share.
enum NullOptions {
    static func checkFilename(_ name: String, _ filename: String) throws {
        guard filename == "\(name)://" else {
            throw BlockError(.invalidArgument, "The only allowed filename for this driver is '\(name)://'", path: filename, operation: "open")
        }
    }

    static func open(_ name: String, filename: String, options: OpenOptions) throws -> any BlockDriver {
        try checkFilename(name, filename)
        return NullNode(driverName: name, readOnly: options.readOnly)
    }

    static func read(_ name: String, _ m: any DriverOptionReader) throws -> ProtocolOpener {
        let size = try m.optionalSize("size") ?? (1 << 30)
        let latency = try m.optionalInt("latency-ns") ?? 0
        let zeroes = try m.optionalBool("read-zeroes") ?? false
        guard latency >= 0 else { throw BlockError(.invalidArgument, "latency-ns is invalid") }
        return { readOnly, _ in
            NullNode(driverName: name, length: size, readZeroes: zeroes, latencyNanoseconds: latency, readOnly: readOnly)
        }
    }

    static func blockdevOptions(_ name: String, filename: String) throws -> QObject.Dict {
        try checkFilename(name, filename)
        return QObject.Dict([("driver", .string(name))])
    }
}
