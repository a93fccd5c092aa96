import QBlockDrivers
import QBlockGraph
/// The one list of format drivers this build has. Everything that chooses a format by
/// name or by probing — ``ImageOpener``, `blockdev-add`, `blockdev-create`,
/// ``ImageCreator``, ``Measure`` — looks it up here; adding a format is its folder and one
/// entry in ``builtIn``.
///
/// Protocol drivers (file, nbd) are not formats: they are listed in ``ProtocolRegistry``,
/// where ``ImageOpener`` picks one by the file name and `blockdev-add` by its `driver` member.
public enum FormatRegistry {
    /// The registered formats. The order is the order ``names`` lists them in.
    public static let builtIn: [any FormatDriver.Type] = [Qcow2Format.self, RawFormat.self]

    /// The registered format names ("qcow2", "raw").
    public static var names: [String] { builtIn.map { $0.name } }

    /// The driver named `name`, or nil when no format has that name.
    public static func driver(named name: String) -> (any FormatDriver.Type)? {
        builtIn.first { $0.name == name }
    }

    /// Bytes from the start of a file that probing reads.
    public static var probeLength: Int { builtIn.map { $0.probeLength }.max() ?? 0 }

    /// The format whose driver is surest about a file starting with `head` (QEMU's
    /// `bdrv_probe_all`: the highest score wins, the first registered on a tie); nil when no
    /// driver claims it (raw claims every file, as a last resort).
    public static func probe(_ head: [UInt8]) -> (any FormatDriver.Type)? {
        var best: (driver: any FormatDriver.Type, score: Int)?
        for d in builtIn {
            let score = d.probe(head)
            if score > 0 && score > (best?.score ?? 0) { best = (d, score) }
        }
        return best?.driver
    }
}
