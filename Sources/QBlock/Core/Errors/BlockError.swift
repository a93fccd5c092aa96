#if canImport(Glibc)
import Glibc
#endif

/// The one error type of the QBlock layer.
///
/// It carries a ``Code`` that callers can switch on, a human message worded like QEMU's,
/// the underlying `errno` when a system call failed, and context: the path, the byte
/// offset and the operation that failed.
public struct BlockError: Error, CustomStringConvertible, Sendable {
    /// A stable classification of the failure. A struct over a private enum so that
    /// codes can be added without breaking exhaustive switches in client code.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        private enum Raw: String, Sendable {
            case io, invalidArgument, corrupt, unsupported, notFound, permissionDenied
            case locked, outOfRange, readOnly, noSpace, busy, closed, cancelled, internalError
        }
        private let raw: Raw
        private init(_ raw: Raw) { self.raw = raw }
        /// An I/O error from the operating system (EIO and friends).
        public static let io = Code(.io)
        /// The caller passed something invalid (an option, a size, a name).
        public static let invalidArgument = Code(.invalidArgument)
        /// Image metadata is inconsistent or malformed.
        public static let corrupt = Code(.corrupt)
        /// A valid feature this implementation does not support.
        public static let unsupported = Code(.unsupported)
        /// A file or backing file does not exist.
        public static let notFound = Code(.notFound)
        /// The operating system refused access.
        public static let permissionDenied = Code(.permissionDenied)
        /// Another process holds a conflicting image lock.
        public static let locked = Code(.locked)
        /// A request lies (partly) beyond the end of the image.
        public static let outOfRange = Code(.outOfRange)
        /// A write was attempted on a read-only node.
        public static let readOnly = Code(.readOnly)
        /// The disk is full.
        public static let noSpace = Code(.noSpace)
        /// The resource is in use.
        public static let busy = Code(.busy)
        /// The node was closed.
        public static let closed = Code(.closed)
        /// The operation was cancelled.
        public static let cancelled = Code(.cancelled)
        /// A bug in this library; never expected.
        public static let internalError = Code(.internalError)
        public var description: String { raw.rawValue }
    }

    /// What kind of failure this is; callers branch on the code, never on the message.
    public var code: Code
    /// The message, worded for a person (as QEMU words it where QEMU has one).
    public var message: String
    /// The errno of the failed system call, if any.
    public var errno: Int32?
    /// The file concerned, if any.
    public var path: String?
    /// The byte offset concerned, if any.
    public var offset: Int64?
    /// What was being done ("read", "open", "allocate cluster"...).
    public var operation: String?
    /// The error that caused this one, if any.
    public var underlying: (any Error & Sendable)?

    /// Creates an error with a code, a message for a person and the context that helps
    /// diagnose it: the `errno` of the failed call, the file `path`, the byte `offset`, the
    /// `operation` and the `underlying` error that caused this one.
    public init(_ code: Code, _ message: String, errno: Int32? = nil, path: String? = nil,
                offset: Int64? = nil, operation: String? = nil, underlying: (any Error & Sendable)? = nil) {
        self.code = code
        self.message = message
        self.errno = errno
        self.path = path
        self.offset = offset
        self.operation = operation
        self.underlying = underlying
    }

    /// An error for a failed system call, classified by errno.
    public static func system(_ err: Int32, _ operation: String, path: String? = nil, offset: Int64? = nil) -> BlockError {
        let code: Code
        switch err {
        case ENOENT, ENOTDIR: code = .notFound
        case EACCES, EPERM: code = .permissionDenied
        case EROFS: code = .readOnly
        case ENOSPC, EDQUOT: code = .noSpace
        case EINVAL: code = .invalidArgument
        case EBUSY: code = .busy
        case EAGAIN: code = .locked
        case ENOTSUP: code = .unsupported
        default: code = .io
        }
        return BlockError(code, BlockError.strerror(err), errno: err, path: path, offset: offset, operation: operation)
    }

    /// `strerror` text for an errno value.
    public static func strerror(_ err: Int32) -> String {
        guard let p = Glibc.strerror(err) else { return "Unknown error \(err)" }
        return String(cString: p)
    }

    /// Returns the same error with context added where none was set.
    public func with(path: String? = nil, offset: Int64? = nil, operation: String? = nil) -> BlockError {
        var e = self
        if e.path == nil { e.path = path }
        if e.offset == nil { e.offset = offset }
        if e.operation == nil { e.operation = operation }
        return e
    }

    /// The errno to report to a peer (an NBD client, a guest) for this error.
    public var errnoValue: Int32 {
        if let errno { return errno }
        switch code {
        case .noSpace: return ENOSPC
        case .readOnly: return EPERM
        case .invalidArgument, .outOfRange: return EINVAL
        case .unsupported: return ENOTSUP
        default: return EIO
        }
    }

    public var description: String { message }
}

extension Error {
    /// This error as a ``BlockError`` (wrapping foreign errors as an internal error).
    public var asBlockError: BlockError {
        if let e = self as? BlockError { return e }
        return BlockError(.internalError, "\(self)")
    }
}
