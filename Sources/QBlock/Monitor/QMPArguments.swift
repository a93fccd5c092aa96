import QBlockCore
/// An error a QMP command returns: QEMU's error class and description, sent as
/// `{"error": {"class": ..., "desc": ...}}`.
public struct QMPError: Error, Sendable, Equatable, CustomStringConvertible {
    /// QEMU's `QapiErrorClass`.
    public enum ErrorClass: String, Sendable {
        case genericError = "GenericError"
        case commandNotFound = "CommandNotFound"
        case deviceNotActive = "DeviceNotActive"
        case deviceNotFound = "DeviceNotFound"
        case kvmMissingCap = "KVMMissingCap"
    }

    /// The `class` member.
    public var errorClass: ErrorClass
    /// The `desc` member: the message, worded as QEMU words it.
    public var desc: String

    /// An error of class `errorClass` with message `desc`.
    public init(_ errorClass: ErrorClass = .genericError, _ desc: String) {
        self.errorClass = errorClass
        self.desc = desc
    }

    /// A `GenericError` with `desc`.
    public static func generic(_ desc: String) -> QMPError { QMPError(.genericError, desc) }

    /// QEMU's "Cannot find device=X nor node-name=Y".
    public static func noDevice(device: String = "", node: String = "") -> QMPError {
        .generic("Cannot find device='\(device)' nor node-name='\(node)'")
    }

    /// The error as a QMP `error` member value.
    public var qobject: QObject {
        .dict(QObject.Dict([("class", .string(errorClass.rawValue)), ("desc", .string(desc))]))
    }

    public var description: String { "\(errorClass.rawValue): \(desc)" }

    /// Any error as a QMP error: a ``QMPError`` as it is, a ``BlockError`` as a
    /// `GenericError` with the first line of its message (later lines are hints for a
    /// terminal — "Is another process using the image …?" — which QEMU leaves out of QMP
    /// replies), anything else with its description.
    public static func from(_ error: any Error) -> QMPError {
        if let e = error as? QMPError { return e }
        if let e = error as? BlockError { return .generic(String(e.message.prefix { $0 != "\n" })) }
        if let e = error as? JSONParseError { return .generic(e.message) }
        return .generic("\(error)")
    }
}

/// The `arguments` of a QMP command (or a nested object of them), read with QEMU's
/// input-visitor checks and messages:
///
/// - a missing mandatory member: "Parameter 'x' is missing";
/// - a member of the wrong JSON type: "Invalid parameter type for 'x', expected: string";
/// - an out-of-range unsigned value: "Parameter 'x' expects uint32_t";
/// - an enum value not in the list: "Parameter 'x' does not accept value 'y'" (the member's
///   own name, without the path, as QEMU's enum visitor words it);
/// - a member nobody read: "Parameter 'x' is unexpected", from ``done()``.
///
/// Nested objects report full names (`addr.data.path`). A handler reads every member it
/// knows, calls ``done()``, and only then acts.
// @unchecked: `used` is only touched by the one handler that parses these arguments (one task at a
// time); `dict` and `path` are immutable.
public final class QMPArguments: @unchecked Sendable {
    /// The members as received.
    public let dict: QObject.Dict
    /// The dotted path of this object inside the arguments ("" at the top).
    public let path: String
    private var used = Set<String>()
    /// Keyval mode (QEMU's `-drive`, `--image-opts`, `json:` file names): a boolean, integer
    /// or size member may also be given as a string ("on", "42", "1M"), and members nobody
    /// read are reported as the block layer reports unknown options.
    public let keyval: Bool
    /// In keyval mode, the driver whose options these are and whether it is a protocol (for
    /// QEMU's "Block format 'qcow2' does not support the option 'x'").
    var owner: (driver: String, isProtocol: Bool)?

    /// Wraps the members `dict` of the object at the dotted `path` ("" for the command's
    /// arguments); `keyval` accepts strings for typed members (see ``keyval``).
    public init(_ dict: QObject.Dict = QObject.Dict(), path: String = "", keyval: Bool = false) {
        self.dict = dict
        self.path = path
        self.keyval = keyval
    }

    /// The full name of member `key`, as QEMU's messages spell it.
    public func name(_ key: String) -> String { path.isEmpty ? key : "\(path).\(key)" }

    /// Whether member `key` is present (it is marked read).
    public func has(_ key: String) -> Bool {
        used.insert(key)
        return dict[key] != nil
    }

    /// The raw value of member `key`, if present (it is marked read).
    public func value(_ key: String) -> QObject? {
        used.insert(key)
        return dict[key]
    }

    private func typeError(_ key: String, _ expected: String) -> QMPError {
        .generic("Invalid parameter type for '\(name(key))', expected: \(expected)")
    }

    /// "Parameter 'x' is missing".
    public func missing(_ key: String) -> QMPError { .generic("Parameter '\(name(key))' is missing") }

    /// Member `key` as a string, nil when absent.
    public func optionalString(_ key: String) throws -> String? {
        guard let v = value(key) else { return nil }
        guard case .string(let s) = v else { throw typeError(key, "string") }
        return s
    }

    /// Mandatory string member `key`.
    public func string(_ key: String) throws -> String {
        guard let s = try optionalString(key) else { throw missing(key) }
        return s
    }

    /// Member `key` as a boolean, nil when absent.
    public func optionalBool(_ key: String) throws -> Bool? {
        guard let v = value(key) else { return nil }
        if keyval, case .string(let text) = v {
            guard let b = KeyvalValue.bool(text) else { throw QMPError.generic("Parameter '\(name(key))' expects 'on' or 'off'") }
            return b
        }
        guard case .bool(let b) = v else { throw typeError(key, "boolean") }
        return b
    }

    /// Boolean member `key`, `d` when absent.
    public func bool(_ key: String, default d: Bool) throws -> Bool { try optionalBool(key) ?? d }

    /// Member `key` as an integer (QAPI `int`), nil when absent.
    public func optionalInt(_ key: String) throws -> Int64? {
        guard let v = value(key) else { return nil }
        if keyval, case .string(let text) = v {
            guard let i = KeyvalValue.int(text) else { throw QMPError.generic("Parameter '\(name(key))' expects a number") }
            return i
        }
        guard case .int(let i) = v else { throw typeError(key, "integer") }
        return i
    }

    /// Mandatory integer member `key`.
    public func int(_ key: String) throws -> Int64 {
        guard let i = try optionalInt(key) else { throw missing(key) }
        return i
    }

    /// An unsigned member of `bits` bits (QEMU's uint8/16/32/64).
    public func optionalUInt(_ key: String, bits: Int = 64) throws -> UInt64? {
        guard var v = value(key) else { return nil }
        if keyval, case .string(let text) = v {
            // (QEMU's block options that are sizes take suffixes; plain numbers are sizes too.)
            guard let n = KeyvalValue.size(text) else { throw KeyvalValue.sizeError(name(key)) }
            v = .int(Int64(bitPattern: n))
        }
        // (QEMU's texts: a non-number "expects uint64", a value out of range "expects uint32_t".)
        guard case .int(let i) = v else { throw QMPError.generic("Parameter '\(name(key))' expects uint64") }
        guard i >= 0, bits >= 64 || UInt64(i) < (UInt64(1) << UInt64(bits)) else {
            throw QMPError.generic("Parameter '\(name(key))' expects uint\(bits)_t")
        }
        return UInt64(i)
    }

    /// A member whose value must be one of `values` (a QAPI enum).
    public func optionalEnum(_ key: String, _ values: [String]) throws -> String? {
        guard let s = try optionalString(key) else { return nil }
        // QEMU's enum visitor names the member without its path (unlike the other errors).
        guard values.contains(s) else { throw QMPError.generic("Parameter '\(key)' does not accept value '\(s)'") }
        return s
    }

    /// Mandatory enum member `key`.
    public func enumValue(_ key: String, _ values: [String]) throws -> String {
        guard let s = try optionalEnum(key, values) else { throw missing(key) }
        return s
    }

    /// A nested object member, as arguments of its own (their names are prefixed).
    public func optionalObject(_ key: String) throws -> QMPArguments? {
        guard let v = value(key) else { return nil }
        guard case .dict(let d) = v else { throw typeError(key, "object") }
        return QMPArguments(d, path: name(key), keyval: keyval)
    }

    /// Mandatory nested object `key`.
    public func object(_ key: String) throws -> QMPArguments {
        guard let o = try optionalObject(key) else { throw missing(key) }
        return o
    }

    /// Member `key` as a list, nil when absent.
    public func optionalList(_ key: String) throws -> [QObject]? {
        guard let v = value(key) else { return nil }
        guard case .list(let l) = v else { throw typeError(key, "array") }
        return l
    }

    /// Mandatory list member `key`.
    public func list(_ key: String) throws -> [QObject] {
        guard let l = try optionalList(key) else { throw missing(key) }
        return l
    }

    /// A list of strings (`['str']`).
    public func optionalStringList(_ key: String) throws -> [String]? {
        guard let l = try optionalList(key) else { return nil }
        return try l.map {
            guard case .string(let s) = $0 else { throw typeError(key, "string") }
            return s
        }
    }

    /// Fails with "Parameter 'x' is unexpected" for the first member not read.
    public func done() throws {
        for e in dict.entries where !used.contains(e.key) {
            if let owner {
                // (QEMU names the option as its flattened key: `encrypt.key-secret`.)
                let key = DriveOptions.flatten(QObject.Dict([(e.key, e.value)])).entries.first?.key ?? e.key
                throw QMPError.generic(owner.isProtocol ? "Block protocol '\(owner.driver)' doesn't support the option '\(key)'"
                                       : "Block format '\(owner.driver)' does not support the option '\(key)'")
            }
            throw QMPError.generic("Parameter '\(name(e.key))' is unexpected")
        }
    }

    /// Marks every member read (for handlers that pass the whole object on).
    public func markAllRead() { for e in dict.entries { used.insert(e.key) } }
}
