import QBlockCore
import QBlockGraph
import QBlockOpen

/// qemu-img's `-o help` (or `-o ?`): the creation options of a format, with those of the
/// protocol below it when a target file name is given, and the amend options of a format.
///
/// Only options this library takes are listed: QEMU also lists qcow2 encryption and external
/// data files, which are refused here.
extension ImageCreator {
    /// The creation options of the protocols a target file name can name, as QEMU's
    /// protocol drivers declare them (nil: the protocol cannot hold a new image).
    static func protocolCreateOptions(_ protocolName: String) -> [CreateOption]? {
        switch protocolName {
        case "file":
            return [CreateOption("size", .size, help: "Virtual disk size"),
                    CreateOption("nocow", .bool, help: "Turn off copy-on-write (valid only on btrfs)"),
                    CreateOption("preallocation", .string, help: "Preallocation mode (allowed values: off, falloc, full)"),
                    CreateOption("extent_size_hint", .size, help: "Extent size hint for the image file, 0 to disable")]
        case "nbd":
            return [CreateOption("size", .size, help: "Virtual disk size"),
                    CreateOption("preallocation", .string, help: "Preallocation mode (allowed values: off)")]
        default:
            return nil
        }
    }

    /// Whether an option string of `-o` asks for help: one of its elements (split at single
    /// commas, `,,` being a literal comma) is `help` or `?` without a value, as QEMU's
    /// `has_help_option`.
    public static func hasHelpOption(_ options: String) -> Bool {
        var element = ""
        var chars = Array(options)[...]
        var found = false
        func check() { if element == "help" || element == "?" { found = true } }
        while let c = chars.popFirst() {
            if c == "," {
                if chars.first == "," { element.append(","); chars = chars.dropFirst(); continue }
                check()
                element = ""
            } else {
                element.append(c)
            }
        }
        check()
        return found
    }

    /// Joins the `-o` arguments into one option string, as qemu-img does, refusing one that
    /// could not be joined safely: empty, starting with a comma or ending with an odd
    /// number of commas.
    /// - Returns: the joined string, or nil when there are none.
    /// - Throws: ``BlockError`` "Invalid option list: ARG".
    public static func accumulateOptions(_ arguments: [String]) throws -> String? {
        for a in arguments {
            let trailing = a.reversed().prefix { $0 == "," }.count
            if a.isEmpty || a.hasPrefix(",") || trailing % 2 == 1 {
                throw BlockError(.invalidArgument, "Invalid option list: \(a)", operation: "create")
            }
        }
        return arguments.isEmpty ? nil : arguments.joined(separator: ",")
    }

    /// What `qemu-img create -f FORMAT -o help [FILENAME]` prints: the format's options, and
    /// with `filename` those of the protocol that would hold the image, sorted.
    /// - Throws: ``BlockError`` with qemu-img's message for an unknown format, a format or
    ///   protocol that cannot create images.
    public static func optionHelp(format: String, filename: String?) throws -> String {
        guard let driver = FormatRegistry.driver(named: format) else {
            if ImageOpener.qemuDriverNames.contains(format) { throw ImageOpener.creationRefusal(format: format) }
            throw BlockError(.invalidArgument, "Unknown file format '\(format)'", operation: "create")
        }
        var entries = driver.createOptions.filter { !$0.protocolLevel }
        if let filename {
            let proto = ProtocolRegistry.driver(forFilename: filename).name
            guard let protoOptions = protocolCreateOptions(proto) else {
                throw BlockError(.unsupported, "Protocol driver '\(proto)' does not support image creation", operation: "create")
            }
            // The format's option wins where both have one; the others only if the format takes them.
            for o in protoOptions where !entries.contains(where: { $0.name == o.name })
                && driver.createOptions.contains(where: { $0.name == o.name }) {
                entries.append(o)
            }
        }
        var text = filename != nil ? "Supported options:\n" : "Supported \(format) options:\n"
        text += helpLines(entries, listName: format)
        if filename == nil {
            text += "\nThe protocol level may support further options.\nSpecify the target filename to include those options.\n"
        }
        return text
    }

    /// What `qemu-img amend -f FORMAT -o help` prints.
    /// - Throws: ``BlockError`` for an unknown format or one that cannot amend images.
    public static func amendOptionHelp(format: String) throws -> String {
        guard let driver = FormatRegistry.driver(named: format) else {
            if ImageOpener.qemuDriverNames.contains(format) {
                throw BlockError(.unsupported, "Format driver '\(format)' does not support option amendment", operation: "amend")
            }
            throw BlockError(.invalidArgument, "Unknown file format '\(format)'", operation: "amend")
        }
        guard let amendable = driver as? any AmendableFormat.Type else {
            throw BlockError(.unsupported, "Format driver '\(format)' does not support option amendment", operation: "amend")
        }
        return "Amend options for '\(format)':\n" + helpLines(amendable.amendOptions, listName: format)
    }

    /// QemuOpts' help listing: "  name=<type>", the description from column 24, sorted.
    static func helpLines(_ entries: [CreateOption], listName: String) -> String {
        if entries.isEmpty { return "There are no options for \(listName).\n" }
        let lines = entries.map { o -> String in
            let type: String
            switch o.type {
            case .string: type = "str"
            case .bool: type = "bool (on/off)"
            case .number: type = "num"
            case .size: type = "size"
            }
            var line = "  \(o.name)=<\(type)>"
            if let help = o.help {
                if line.utf8.count < 24 { line += String(repeating: " ", count: 24 - line.utf8.count) }
                line += " - \(help)"
            }
            return line
        }
        return lines.sorted { Array($0.utf8).lexicographicallyPrecedes(Array($1.utf8)) }.map { $0 + "\n" }.joined()
    }
}
