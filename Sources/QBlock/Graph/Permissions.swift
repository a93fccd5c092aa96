/// Block-layer permissions, with the bit values QEMU uses for its image locks.
public struct BlockPermissions: OptionSet, Sendable, Hashable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    /// Reading returns consistent data (QEMU's `BLK_PERM_CONSISTENT_READ`).
    public static let consistentRead = BlockPermissions(rawValue: 0x01)
    /// Changing the visible content.
    public static let write = BlockPermissions(rawValue: 0x02)
    /// Writes that leave the visible content unchanged (a job copying data that is already there).
    public static let writeUnchanged = BlockPermissions(rawValue: 0x04)
    /// Changing the size.
    public static let resize = BlockPermissions(rawValue: 0x08)
    /// Every permission: what an exclusive writer takes and shares none of.
    public static let all: BlockPermissions = [.consistentRead, .write, .writeUnchanged, .resize]

    package static let names: [(BlockPermissions, String)] = [
        (.consistentRead, "consistent read"), (.write, "write"),
        (.writeUnchanged, "write unchanged"), (.resize, "resize"),
    ]
}
