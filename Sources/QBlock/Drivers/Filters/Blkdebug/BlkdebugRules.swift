#if canImport(Glibc)
import Glibc
#endif
import QBlockCore
import QBlockGraph

/// The kinds of request a blkdebug `inject-error` rule can fail (QAPI's `BlkdebugIOType`).
public enum BlkdebugIOType: String, CaseIterable, Sendable {
    /// Reads.
    case read
    /// Writes.
    case write
    /// Write-zeroes requests.
    case writeZeroes = "write-zeroes"
    /// Discards.
    case discard
    /// Flushes.
    case flush
    /// Block-status queries (never in the default set).
    case blockStatus = "block-status"

    /// The types a rule without `iotype` fails: all but block-status, as QEMU.
    public static let defaultSet: Set<BlkdebugIOType> = [.read, .write, .writeZeroes, .discard, .flush]
}

/// One blkdebug rule: when ``event`` is reported while the node is in ``state`` (0: any
/// state), the rule's action is taken.
public struct BlkdebugRule: Sendable, Equatable {
    /// What the rule does when its event fires.
    public enum Action: Sendable, Equatable {
        /// Arms error injection: later requests of `ioTypes` that cover `offset` (nil: any)
        /// fail with `errno`; `once` disarms the rule after its first error. `immediately`
        /// is QEMU's "fail without yielding first"; our requests fail at once either way.
        case injectError(errno: Int32, ioTypes: Set<BlkdebugIOType>, offset: Int64?, once: Bool, immediately: Bool)
        /// Moves the node to state `newState`.
        case setState(newState: Int)
    }
    /// The event that fires the rule.
    public var event: BlkdebugEvent
    /// The state the node must be in for the rule to fire; 0 matches every state.
    public var state: Int
    /// What happens.
    public var action: Action

    /// Creates a rule from its parts (see the properties).
    public init(event: BlkdebugEvent, state: Int = 0, action: Action) {
        self.event = event
        self.state = state
        self.action = action
    }
}

/// Reading blkdebug's rules: the config file (QEMU's `-readconfig` syntax of `[inject-error]`
/// and `[set-state]` groups of `name = "value"` lines) and the `inject-error` / `set-state`
/// members of `blockdev-add`, which name the same options.
public enum BlkdebugConfig {
    /// Parses the text of a blkdebug config file.
    /// - Throws: ``BlockError`` `.invalidArgument` with QEMU's wording ("parse error",
    ///   "no group defined", an unknown event or option).
    public static func parse(_ text: String, fileName: String = "config") throws -> [BlkdebugRule] {
        var rules: [BlkdebugRule] = []
        var group: String?
        var fields: [(String, String)] = []
        func finish() throws {
            if let g = group { rules.append(try rule(group: g, fields: fields)) }
        }
        var lineNumber = 0
        for raw in text.split(separator: "\n", omittingEmptySubsequences: false) {
            lineNumber += 1
            let line = String(raw)
            if line.isEmpty || line.hasPrefix("#") { continue }
            if line.hasPrefix("[") {
                let inner = line.dropFirst().prefix { $0 != "]" }
                let name = inner.split(separator: " ").first.map(String.init) ?? ""
                if !name.isEmpty {
                    try finish()
                    group = name
                    fields = []
                    continue
                }
            }
            guard let (key, value) = assignment(line) else {
                throw BlockError(.invalidArgument, "\(fileName):\(lineNumber): parse error", operation: "open")
            }
            guard group != nil else {
                throw BlockError(.invalidArgument, "\(fileName):\(lineNumber): no group defined", operation: "open")
            }
            fields.append((key, value))
        }
        try finish()
        return rules
    }

    /// `name = "value"` (spaces around `=` optional, as QEMU's scanf pattern allows).
    private static func assignment(_ line: String) -> (String, String)? {
        let trimmed = line.drop { $0 == " " || $0 == "\t" }
        let key = trimmed.prefix { $0 != " " && $0 != "\t" && $0 != "=" }
        guard !key.isEmpty else { return nil }
        var rest = trimmed.dropFirst(key.count).drop { $0 == " " || $0 == "\t" }
        guard rest.first == "=" else { return nil }
        rest = rest.dropFirst().drop { $0 == " " || $0 == "\t" }
        guard rest.first == "\"" else { return nil }
        rest = rest.dropFirst()
        guard let close = rest.firstIndex(of: "\"") else { return nil }
        return (String(key), String(rest[..<close]))
    }

    /// Builds the rule of one `[inject-error]` or `[set-state]` group from its options
    /// (values as strings, as the config file and QEMU's flattened options give them).
    /// - Throws: ``BlockError`` `.invalidArgument` for an unknown group, option, event,
    ///   I/O type, or a value of the wrong type.
    public static func rule(group: String, fields: [(String, String)]) throws -> BlkdebugRule {
        let allowed: [String]
        switch group {
        case "inject-error": allowed = ["event", "state", "iotype", "errno", "sector", "once", "immediately"]
        case "set-state": allowed = ["event", "state", "new_state"]
        default: throw BlockError(.invalidArgument, "There is no option group '\(group)'", operation: "open")
        }
        var values: [String: String] = [:]
        for (k, v) in fields {
            guard allowed.contains(k) else {
                throw BlockError(.invalidArgument, "Invalid parameter '\(k)'", operation: "open")
            }
            values[k] = v
        }
        guard let eventName = values["event"] else {
            throw BlockError(.invalidArgument, "Missing event name for rule", operation: "open")
        }
        guard let event = BlkdebugEvent(rawValue: eventName) else {
            throw BlockError(.invalidArgument, "Invalid parameter '\(eventName)'", operation: "open")
        }
        let state = try number(values["state"], "state") ?? 0
        if group == "set-state" {
            return BlkdebugRule(event: event, state: Int(state), action: .setState(newState: Int(try number(values["new_state"], "new_state") ?? 0)))
        }
        var types = BlkdebugIOType.defaultSet
        if let t = values["iotype"] {
            guard let type = BlkdebugIOType(rawValue: t) else {
                throw BlockError(.invalidArgument, "Invalid parameter '\(t)'", operation: "open")
            }
            types = [type]
        }
        let sector = try number(values["sector"], "sector") ?? -1
        return BlkdebugRule(event: event, state: Int(state), action: .injectError(
            errno: Int32(truncatingIfNeeded: try number(values["errno"], "errno") ?? Int64(EIO)),
            ioTypes: types, offset: sector == -1 ? nil : sector * 512,
            once: try bool(values["once"], "once") ?? false,
            immediately: try bool(values["immediately"], "immediately") ?? false))
    }

    private static func number(_ s: String?, _ name: String) throws -> Int64? {
        guard let s else { return nil }
        if let v = Int64(s) { return v }
        if s.hasPrefix("0x"), let v = Int64(s.dropFirst(2), radix: 16) { return v }
        throw BlockError(.invalidArgument, "Parameter '\(name)' expects a number", operation: "open")
    }

    private static func bool(_ s: String?, _ name: String) throws -> Bool? {
        switch s {
        case nil: return nil
        case "on", "yes", "true", "y": return true
        case "off", "no", "false", "n": return false
        default: throw BlockError(.invalidArgument, "Parameter '\(name)' expects 'on' or 'off'", operation: "open")
        }
    }
}
