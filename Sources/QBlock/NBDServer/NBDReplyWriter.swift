#if canImport(Glibc)
import Glibc
#endif
import Foundation
import QBlockCore
import QBlockJobs

/// One piece of a reply: bytes owned by the reply, or memory owned by the task that
/// awaits the send (a read buffer).
// @unchecked: the `.borrowed` pointer is only read by the writer thread while the task that owns the
// memory awaits the send (the writer signals completion before that task resumes).
enum NBDReplyPart: @unchecked Sendable {
    case bytes([UInt8])
    /// SAFETY: the memory stays valid until the ``NBDReplyWriter/send(_:)`` call that
    /// carries it returns; the awaiting task owns it until then.
    case memory(UnsafeRawBufferPointer)
}

/// Serializes the replies of one connection onto its socket from a dedicated thread, so
/// that blocking `sendmsg` calls never run on the cooperative pool and a slow client
/// never holds a shared I/O thread. Replies go out whole (each reply's parts in one
/// `sendmsg` where possible), in the order they were queued.
// @unchecked: `queue`, `head`, `stopping`, `broken` and `thread` are only touched with `condition`
// held; `scratch` is confined to the writer thread (and `deinit`); `fd` is immutable.
final class NBDReplyWriter: @unchecked Sendable {
    private struct Job {
        var parts: [NBDReplyPart]
        var done: UnsafeContinuation<Bool, Never>?
    }

    private let fd: Int32
    private let condition = NSCondition()
    private var queue: [Job] = []
    private var head = 0
    private var stopping = false
    private var broken = false
    private var thread: Thread?
    private let exited = AsyncEventSync()

    init(fd: Int32) { self.fd = fd }

    func start(name: String) {
        let t = Thread { [self] in self.loop() }
        t.name = name
        t.stackSize = 256 * 1024
        thread = t
        t.start()
    }

    /// Queues a reply and waits until it was written; false if the connection broke.
    func send(_ parts: [NBDReplyPart]) async -> Bool {
        await withUnsafeContinuation { (c: UnsafeContinuation<Bool, Never>) in
            enqueue(Job(parts: parts, done: c))
        }
    }

    /// Queues a reply without waiting (its bytes are owned by the job).
    func post(_ bytes: [UInt8]) {
        enqueue(Job(parts: [.bytes(bytes)], done: nil))
    }

    private func enqueue(_ job: Job) {
        condition.lock()
        if stopping || broken {
            condition.unlock()
            job.done?.resume(returning: false)
            return
        }
        queue.append(job)
        condition.signal()
        condition.unlock()
    }

    /// Sends what is queued, then ends the thread and waits for it (call from a thread
    /// that may block).
    func finish() {
        condition.lock()
        stopping = true
        condition.signal()
        condition.unlock()
        if thread != nil { exited.wait() }
    }

    private func loop() {
        condition.lock()
        while true {
            while head == queue.count && !stopping { condition.wait() }
            if head == queue.count { break }
            let job = queue[head]
            queue[head] = Job(parts: [], done: nil)
            head += 1
            if head == queue.count {
                queue.removeAll(keepingCapacity: true)
                head = 0
            }
            let isBroken = broken
            condition.unlock()
            var ok = false
            if !isBroken {
                ok = write(job.parts)
                if !ok {
                    // The peer is gone: wake the reader so the connection ends.
                    SocketCalls.shutdown(fd)
                }
            }
            job.done?.resume(returning: ok)
            condition.lock()
            if !ok { broken = true }
        }
        condition.unlock()
        exited.signal()
    }

    /// Header bytes of the reply being written, copied into one buffer owned by the
    /// writer thread and reused, so their pointers are valid for the whole `sendmsg`.
    private var scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 16)

    deinit { scratch.deallocate() }

    private func write(_ parts: [NBDReplyPart]) -> Bool {
        var need = 0
        for p in parts { if case .bytes(let b) = p { need += b.count } }
        if need > scratch.count {
            scratch.deallocate()
            scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: need, alignment: 16)
        }
        var buffers: [UnsafeRawBufferPointer] = []
        buffers.reserveCapacity(parts.count)
        var used = 0
        for p in parts {
            switch p {
            case .bytes(let b):
                // SAFETY: `scratch` is only touched by the writer thread and outlives the send.
                let dst = UnsafeMutableRawBufferPointer(rebasing: scratch[used..<(used + b.count)])
                dst.copyBytes(from: b)
                buffers.append(UnsafeRawBufferPointer(dst))
                used += b.count
            case .memory(let m):
                buffers.append(m)
            }
        }
        if case .success = SocketCalls.sendAll(fd, buffers) { return true }
        return false
    }
}

/// A one-shot event a blocking thread can wait on.
// @unchecked: `signalled` is only touched with `condition` held.
final class AsyncEventSync: @unchecked Sendable {
    private let condition = NSCondition()
    private var signalled = false

    func wait() {
        condition.lock()
        while !signalled { condition.wait() }
        condition.unlock()
    }

    func signal() {
        condition.lock()
        signalled = true
        condition.broadcast()
        condition.unlock()
    }
}
