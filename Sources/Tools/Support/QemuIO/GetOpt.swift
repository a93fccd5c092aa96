import QBlock
/// Command options parsed the way qemu-io's commands parse them (glibc `getopt` with
/// argument permutation): clustered flags (`-qv`), attached or separate option arguments
/// (`-P0xab`, `-P 0xab`), options after operands, and `--` to end options.
struct GetOpt {
    enum Item {
        case option(Character, String?)
        /// An unknown option or a missing argument, with glibc's message.
        case error(String)
    }

    private(set) var items: [Item] = []
    private(set) var operands: [String] = []

    /// - Parameters:
    ///   - argv: the command words, the command name first.
    ///   - spec: option letters, each followed by `:` if it takes an argument.
    init(_ argv: [String], _ spec: String) {
        var takesArgument: [Character: Bool] = [:]
        let specChars = Array(spec)
        for (i, c) in specChars.enumerated() where c != ":" {
            takesArgument[c] = i + 1 < specChars.count && specChars[i + 1] == ":"
        }
        let name = argv.first ?? ""
        var i = 1
        var onlyOperands = false
        while i < argv.count {
            let word = argv[i]
            i += 1
            if onlyOperands || !word.hasPrefix("-") || word == "-" {
                operands.append(word)
                continue
            }
            if word == "--" {
                onlyOperands = true
                continue
            }
            let chars = Array(word.dropFirst())
            var k = 0
            while k < chars.count {
                let c = chars[k]
                k += 1
                guard let hasArgument = takesArgument[c] else {
                    items.append(.error("\(name): invalid option -- '\(c)'"))
                    continue
                }
                if !hasArgument {
                    items.append(.option(c, nil))
                } else if k < chars.count {
                    items.append(.option(c, String(chars[k...])))
                    k = chars.count
                } else if i < argv.count {
                    items.append(.option(c, argv[i]))
                    i += 1
                } else {
                    items.append(.error("\(name): option requires an argument -- '\(c)'"))
                }
            }
        }
    }
}
