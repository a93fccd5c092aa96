/// The one error type of QMachine: a code, a message worded for the user, and where it
/// happened (guest address, device, operation). Mirrors QBlock's `BlockError`.
public struct MachineError: Error, CustomStringConvertible, Sendable {
    /// What kind of failure this is; callers branch on the code, never on the message.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        private enum Value: String, Sendable {
            case invalidArgument, outOfMemory, badImage, busConflict, unsupported, guestCrash, io
        }
        private let value: Value
        private init(_ v: Value) { value = v }
        /// An argument or configuration the machine cannot use (memory size, CPU count, option).
        public static let invalidArgument = Code(.invalidArgument)
        /// The host could not provide guest RAM (mmap failed).
        public static let outOfMemory = Code(.outOfMemory)
        /// A kernel, initrd or firmware file that cannot be loaded.
        public static let badImage = Code(.badImage)
        /// Two devices mapped over one another.
        public static let busConflict = Code(.busConflict)
        /// Something the machine does not implement (an instruction, a device feature).
        public static let unsupported = Code(.unsupported)
        /// The guest stopped in a way it cannot recover from (double fault, bad trap vector).
        public static let guestCrash = Code(.guestCrash)
        /// A host I/O error (KVM ioctl, file read, socket).
        public static let io = Code(.io)
        public var description: String { value.rawValue }
    }

    /// What kind of failure this is.
    public var code: Code
    /// The message, worded for a person.
    public var message: String
    /// Guest physical or virtual address, when one is involved.
    public var address: UInt64?
    /// What was being done ("load kernel", "map device", "execute").
    public var operation: String?
    /// The error that caused this one, if any.
    public var underlying: (any Error)?

    /// Creates an error with a code, a message for a person, and optionally the guest
    /// `address`, the `operation` and the `underlying` error.
    public init(_ code: Code, _ message: String, address: UInt64? = nil, operation: String? = nil, underlying: (any Error)? = nil) {
        self.code = code
        self.message = message
        self.address = address
        self.operation = operation
        self.underlying = underlying
    }

    public var description: String { message }
}
