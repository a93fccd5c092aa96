import ArgumentParser
import QBlock
import ToolSupport

/// `img bitmap`: offline persistent bitmap operations, as `qemu-img bitmap` (several
/// operations in one call, applied in the order given; the image is opened read-write
/// without its backing file and the bitmaps are stored when it is closed).
struct ImgBitmap: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "bitmap", abstract: "Add, remove, clear, enable, disable or merge persistent bitmaps.")

    @OptionGroup var image: ImageOptions
    @Flag(name: .customLong("add"), help: "Add a persistent bitmap.") var add: Int
    @Flag(name: .customLong("remove"), help: "Remove the bitmap.") var remove: Int
    @Flag(name: .customLong("clear"), help: "Clear the bitmap.") var clear: Int
    @Flag(name: .customLong("enable"), help: "Enable the bitmap.") var enable: Int
    @Flag(name: .customLong("disable"), help: "Disable the bitmap.") var disable: Int
    @Option(name: .customLong("merge"), parsing: .singleValue, help: "Merge this source bitmap into the bitmap.") var merge: [String] = []
    @Option(name: [.customShort("g"), .customLong("granularity")], help: "Granularity for --add.") var granularity: String?
    @Option(name: .customShort("b"), help: "Image holding the --merge source bitmap.") var sourceFile: String?
    @Option(name: .customShort("F"), help: "Format of the -b image.") var sourceFormat: String?
    @Argument(help: "Image file name and bitmap name.") var positionals: [String] = []

    enum Action {
        case add, remove, clear, enable, disable, merge(String)
        var name: String {
            switch self {
            case .add: return "add"
            case .remove: return "remove"
            case .clear: return "clear"
            case .enable: return "enable"
            case .disable: return "disable"
            case .merge: return "merge"
            }
        }
    }

    /// The actions in command-line order (the parser keeps counts, not order).
    func orderedActions() -> [Action] {
        var out: [Action] = []
        var merges = merge[...]
        let args = Array(CommandLine.arguments.dropFirst())
        var i = 0
        while i < args.count {
            let a = args[i]
            if a == "--" { break }
            switch a {
            case "--add": out.append(.add)
            case "--remove": out.append(.remove)
            case "--clear": out.append(.clear)
            case "--enable": out.append(.enable)
            case "--disable": out.append(.disable)
            default:
                if a == "--merge" || a.hasPrefix("--merge="), let m = merges.popFirst() {
                    out.append(.merge(m))
                    if a == "--merge" { i += 1 }
                } else if ["-f", "-g", "-b", "-F"].contains(a) {
                    i += 1
                }
            }
            i += 1
        }
        return out
    }

    func run() async throws {
        var g: Int64 = 0
        if let granularity { g = try tool.parseSize(granularity, what: "granularity") }
        let actions = orderedActions()
        if actions.isEmpty { throw tool.fail("Need at least one of --add, --remove, --clear, --enable, --disable, or --merge") }
        if g != 0 && add == 0 { throw tool.fail("granularity only supported with --add") }
        if sourceFormat != nil && sourceFile == nil { throw tool.fail("-F only supported with -b") }
        if sourceFile != nil && merge.isEmpty { throw tool.fail("Merge bitmap source file only supported with --merge") }
        guard positionals.count == 2 else { throw tool.fail("Expecting filename and bitmap name") }
        let (filename, name) = (positionals[0], positionals[1])

        let node = try await image.open(filename, readOnly: false, openBacking: false)
        var source: (any BlockDriver)?
        if let sourceFile {
            do {
                let o = try ImageOptions.parse(sourceFormat.map { ["-f", $0] } ?? [])
                source = try await o.open(sourceFile, readOnly: true, openBacking: false)
            } catch {
                await closeQuietly(node)
                throw error
            }
        }
        var failure: ExitCode?
        for act in actions {
            do {
                try await perform(act, on: node, name: name, granularity: g, source: source ?? node)
            } catch let e as BlockError {
                failure = tool.fail("Operation \(act.name) on bitmap \(name) failed: \(e.message)")
                break
            }
        }
        if let source { await closeQuietly(source) }
        do {
            try await node.close()
        } catch let e as BlockError {
            tool.printError("Lost persistent bitmaps during inactivation of node '\(nodeName)': \(e.message)")
        }
        if let failure { throw failure }
    }

    /// The node name qemu-img's messages show for an anonymous node.
    var nodeName: String { "#block100" }

    private func perform(_ act: Action, on node: any BlockDriver, name: String, granularity: Int64,
                         source: any BlockDriver) async throws {
        let q = node as? any PersistentBitmapStore
        func lookup(_ n: String, in node: any BlockDriver) throws -> DirtyBitmap {
            guard let b = (node as? any PersistentBitmapStore)?.persistentBitmaps.named(n) else {
                throw BlockError(.notFound, "Dirty bitmap '\(n)' not found")
            }
            return b
        }
        switch act {
        case .add:
            guard let q else {
                if name.isEmpty { throw BlockError(.invalidArgument, "Bitmap name cannot be empty") }
                throw BlockError(.unsupported, "Can't store persistent bitmaps to \(nodeName): Operation not supported")
            }
            try q.addPersistentBitmap(name: name, granularity: granularity == 0 ? nil : granularity, disabled: false, nodeName: nodeName)
        case .remove:
            guard let q else { throw BlockError(.notFound, "Dirty bitmap '\(name)' not found") }
            try await q.removePersistentBitmap(named: name)
        case .clear:
            let b = try lookup(name, in: node)
            if let e = b.useError() { throw e }
            b.clear()
        case .enable, .disable:
            let b = try lookup(name, in: node)
            if let e = b.useError(allowReadOnly: true) { throw e }
            if case .enable = act { b.isEnabled = true } else { b.isEnabled = false }
        case .merge(let sourceName):
            let dst = try lookup(name, in: node)
            if let e = dst.useError() { throw e }
            let src = try lookup(sourceName, in: source)
            if let e = src.useError(allowReadOnly: true) { throw e }
            try dst.merge(from: src)
        }
    }
}
