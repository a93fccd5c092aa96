/// Block-layer permissions, with the bit values QEMU uses for its image locks.
public struct BlockPermissions: OptionSet, Sendable, Hashable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let consistentRead = BlockPermissions(rawValue: 0x01)
    public static let write = BlockPermissions(rawValue: 0x02)
    public static let writeUnchanged = BlockPermissions(rawValue: 0x04)
    public static let resize = BlockPermissions(rawValue: 0x08)
    public static let all: BlockPermissions = [.consistentRead, .write, .writeUnchanged, .resize]

    package static let names: [(BlockPermissions, String)] = [
        (.consistentRead, "consistent read"), (.write, "write"),
        (.writeUnchanged, "write unchanged"), (.resize, "resize"),
    ]
}
