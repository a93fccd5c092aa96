import CKVM
#if canImport(Glibc)
import Glibc
#endif

/// A KVM virtual machine: guest memory slots and vCPUs (cloud-hypervisor's `Vm`).
///
/// Memory is registered once per ``GuestRAM`` with `KVM_SET_USER_MEMORY_REGION`; the VM
/// keeps each mapped ``GuestRAM`` alive while the VM exists, since the kernel holds its
/// host address.
// @unchecked: `slots` and `vcpuIDs` are only touched with `lock` held; `hypervisor` and `fd` are
// immutable.
public final class KVMVirtualMachine: @unchecked Sendable {
    let hypervisor: KVMHypervisor
    let fd: Int32
    private let lock = DeviceLock()
    private var slots: [GuestRAM] = []
    private var vcpuIDs: Set<Int> = []

    init(hypervisor: KVMHypervisor, fd: Int32) {
        self.hypervisor = hypervisor
        self.fd = fd
    }

    deinit { ckvm_close(fd) }

    /// Makes `ram` guest-physical memory at `ram.base` in the next free slot.
    /// - Throws: `.invalidArgument` when the range overlaps a mapped slot or KVM rejects it.
    public func map(_ ram: GuestRAM) throws {
        try lock.withLock {
            for s in slots where ram.base < s.base &+ s.size && s.base < ram.base &+ ram.size {
                throw MachineError(.invalidArgument, "RAM at 0x\(String(ram.base, radix: 16)) overlaps the slot at 0x\(String(s.base, radix: 16))",
                                   address: ram.base, operation: "map guest memory")
            }
            // SAFETY: `ram.host` is a live mapping of `ram.size` bytes, kept alive by `slots`
            // for as long as this VM (and so the kernel's reference to it) exists.
            let rc = ckvm_set_memory_region(fd, UInt32(slots.count), 0, ram.base, ram.size, ram.host)
            guard rc >= 0 else {
                throw MachineError(.invalidArgument, "KVM_SET_USER_MEMORY_REGION (0x\(String(ram.base, radix: 16)), \(ram.size) bytes) failed: \(Errno.text(-rc))",
                                   address: ram.base, operation: "map guest memory")
            }
            slots.append(ram)
        }
    }

    /// The RAM regions mapped so far.
    public var memory: [GuestRAM] { lock.withLock { slots } }

    /// Creates vCPU `id`, its exits dispatched to `ports` (x86 port I/O) and `mmio`.
    /// The vCPU sees the host's supported CPUID (long mode among it).
    /// - Throws: `.invalidArgument` for a duplicate id, `.unsupported` when KVM refuses.
    public func createVCPU(id: Int, ports: Bus, mmio: Bus) throws -> KVMVCPU {
        try lock.withLock {
            guard !vcpuIDs.contains(id), id >= 0 else {
                throw MachineError(.invalidArgument, "vCPU id \(id) is taken or negative", operation: "create vCPU")
            }
            let cpu = ckvm_create_vcpu(fd, Int32(id))
            guard cpu >= 0 else {
                throw MachineError(.unsupported, "KVM_CREATE_VCPU \(id) failed: \(Errno.text(-cpu))", operation: "create vCPU")
            }
            let rc = ckvm_set_supported_cpuid(hypervisor.fd, cpu)
            guard rc >= 0 else {
                ckvm_close(cpu)
                throw MachineError(.unsupported, "setting vCPU \(id)'s CPUID failed: \(Errno.text(-rc))", operation: "create vCPU")
            }
            var err: Int32 = 0
            guard let run = ckvm_map_run(cpu, hypervisor.vcpuMmapSize, &err) else {
                ckvm_close(cpu)
                throw MachineError(.outOfMemory, "mapping vCPU \(id)'s kvm_run failed: \(Errno.text(-err))", operation: "create vCPU")
            }
            vcpuIDs.insert(id)
            return KVMVCPU(vm: self, id: id, fd: cpu, run: run, runSize: hypervisor.vcpuMmapSize, ports: ports, mmio: mmio)
        }
    }
}
