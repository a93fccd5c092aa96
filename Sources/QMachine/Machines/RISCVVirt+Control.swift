import QBlock

/// Pausing and resuming a running machine (QMP `stop` / `cont`).
///
/// The vCPU thread runs the hart through a ``VCPUGate``: `pause()` asks the hart to stop
/// (``VirtualCPU/requestStop()``), and the thread parks instead of ending; `resume()` lets it
/// call `run()` again on the same hart, which keeps all of its state. A paused machine's
/// disks are quiet: every virtio-blk request taken from a queue has completed (its used
/// element and interrupt are posted; the guest sees them after `cont`); `MachineControl`
/// then flushes every node, so that an external copy of the disks is consistent.
extension RISCVVirtMachine {
    /// Stops the hart and waits for every virtio-blk request in flight (the caller then
    /// flushes the disks: `MachineControl` flushes every node of the graph). Returns at once
    /// if the hart already finished. Never throws.
    public func pause() async throws {
        await gate.pause(cpu)
        while blocks.contains(where: { $0.requestsInFlight > 0 }) {
            try? await Task.sleep(nanoseconds: 200_000)
        }
    }

    /// Lets a paused hart run again.
    public func resume() { gate.resume() }

    /// Whether the hart is parked by ``pause()``.
    public var isPaused: Bool { gate.isParked }
}

/// The loop around a vCPU's `run()`: a `.stopped` exit asked for by ``pause(_:)`` parks the
/// thread until ``resume()``; any other exit (or ``quit(_:)``) ends it.
// @unchecked: the pause/quit/park flags and `parkWaiters` are only touched with `lock` held.
final class VCPUGate: @unchecked Sendable {
    private let lock = DeviceLock()
    private var wantPause = false
    private var wantQuit = false
    private var parked = false
    private var finished = false
    private var parkWaiters: [CheckedContinuation<Void, Never>] = []

    var isParked: Bool { lock.withLock { parked } }

    /// Runs `cpu` on the calling thread until it exits for good.
    func run(_ cpu: any VirtualCPU) -> VCPUExit {
        while true {
            let exit = cpu.run()
            guard exit == .stopped else { return finish(exit) }
            var waiters: [CheckedContinuation<Void, Never>] = []
            let quit: Bool = lock.withLock {
                if wantQuit { return true }
                guard wantPause else { return false }      // a stale stop: run on
                parked = true
                waiters = parkWaiters
                parkWaiters = []
                return false
            }
            if quit { return finish(exit) }
            for w in waiters { w.resume() }
            let quitWhileParked: Bool = lock.withLock {
                while wantPause && !wantQuit { lock.wait() }
                parked = false
                return wantQuit
            }
            if quitWhileParked { return finish(.stopped) }
        }
    }

    private func finish(_ exit: VCPUExit) -> VCPUExit {
        let waiters: [CheckedContinuation<Void, Never>] = lock.withLock {
            finished = true
            defer { parkWaiters = [] }
            return parkWaiters
        }
        for w in waiters { w.resume() }
        return exit
    }

    /// Asks the hart to park and returns once it has (or once the thread has ended).
    func pause(_ cpu: any VirtualCPU) async {
        let already: Bool = lock.withLock {
            if finished || parked { wantPause = true; return true }
            wantPause = true
            return false
        }
        if already { return }
        await withCheckedContinuation { (k: CheckedContinuation<Void, Never>) in
            let now: Bool = lock.withLock {
                if finished || parked { return true }
                parkWaiters.append(k)
                return false
            }
            if now { k.resume() } else { cpu.requestStop() }
        }
    }

    /// Unparks the hart.
    func resume() {
        lock.withLock {
            wantPause = false
            lock.broadcast()
        }
    }

    /// Ends the run loop: a running hart is stopped, a parked one released.
    func quit(_ cpu: any VirtualCPU) {
        lock.withLock {
            wantQuit = true
            lock.broadcast()
        }
        cpu.requestStop()
    }
}
