#if canImport(Glibc)
import Glibc
#endif
import QBlock

/// qemu-io's blkdebug breakpoint commands: `break`, `remove_break`, `resume`, `wait_break`.
/// They act on the first node with ``DebugBreakpoints`` below the open image (a blkdebug
/// node); without one they fail as QEMU's do, with ENOTSUP.
extension QemuIOSession {
    private func breakpointNode(_ what: String) -> (any DebugBreakpoints)? {
        guard let b = node?.debugBreakpointNode else {
            out("\(what): \(BlockError.strerror(ENOTSUP))\n")
            return nil
        }
        return b
    }

    /// `break event tag`
    func breakCommand(_ argv: [String]) -> Bool {
        guard let b = breakpointNode("Could not set breakpoint") else { return false }
        guard let event = BlkdebugEvent(rawValue: argv[1]) else {
            out("Could not set breakpoint: \(BlockError.strerror(ENOENT))\n")
            return false
        }
        b.setBreakpoint(event: event, tag: argv[2])
        return true
    }

    /// `remove_break tag`
    func removeBreakCommand(_ argv: [String]) -> Bool {
        guard let b = breakpointNode("Could not remove breakpoint \(argv[1])") else { return false }
        guard b.removeBreakpoint(tag: argv[1]) else {
            out("Could not remove breakpoint \(argv[1]): \(BlockError.strerror(ENOENT))\n")
            return false
        }
        return true
    }

    /// `resume tag`
    func resumeCommand(_ argv: [String]) -> Bool {
        guard let b = breakpointNode("Could not resume request") else { return false }
        guard b.resume(tag: argv[1]) else {
            out("Could not resume request: \(BlockError.strerror(ENOENT))\n")
            return false
        }
        return true
    }

    /// `wait_break tag`: waits (as long as it takes, as qemu-io) until a request is stopped
    /// with `tag`.
    func waitBreakCommand(_ argv: [String]) async -> Bool {
        guard let b = node?.debugBreakpointNode else { return true }
        while !b.isSuspended(tag: argv[1]) {
            try? await Task.sleep(nanoseconds: 200_000)
        }
        return true
    }
}
