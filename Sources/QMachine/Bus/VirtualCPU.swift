/// A virtual CPU run on its own thread by the machine, whatever the accelerator.
public protocol VirtualCPU: AnyObject, Sendable {
    /// Runs guest code until the guest stops; blocks the calling (dedicated) thread.
    func run() -> VCPUExit
    /// Asks ``run()`` to return `.stopped` soon (from any thread); wakes a sleeping CPU.
    func requestStop()
}
