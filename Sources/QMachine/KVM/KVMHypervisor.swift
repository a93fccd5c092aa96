import CKVM
#if canImport(Glibc)
import Glibc
#endif

/// The KVM accelerator's entry point: an open `/dev/kvm` (cloud-hypervisor's
/// `Hypervisor`). It makes ``KVMVirtualMachine``s, which make ``KVMVCPU``s; devices never
/// see any of them, only the ``Bus``es the vCPUs dispatch port I/O and MMIO exits to.
///
/// ```swift
/// let kvm = try KVMHypervisor()                  // throws .unsupported without usable KVM
/// let vm = try kvm.createVirtualMachine()
/// try vm.map(ram)
/// let cpu = try vm.createVCPU(id: 0, ports: portBus, mmio: mmioBus)
/// ```
// @unchecked: no mutable state: the descriptor and sizes are immutable; KVM ioctls on it are
// thread-safe.
public final class KVMHypervisor: @unchecked Sendable {
    /// Where the KVM device node lives.
    public static let defaultPath = "/dev/kvm"
    /// The only stable KVM API version (Linux 2.6.22 onwards).
    public static let expectedAPIVersion: Int32 = 12

    let fd: Int32
    /// The size of each vCPU's shared `kvm_run` mapping.
    let vcpuMmapSize: Int
    /// What `KVM_GET_API_VERSION` returned.
    public let apiVersion: Int32

    /// Opens `/dev/kvm` and checks the API version.
    /// - Throws: ``MachineError`` `.unsupported` when the device is absent, refuses to be
    ///   opened (permissions, a container without it), or speaks another API version.
    public init(path: String = KVMHypervisor.defaultPath) throws {
        let fd = ckvm_open(path)
        guard fd >= 0 else {
            let why: String
            switch -fd {
            case ENOENT: why = "\(path) does not exist (no KVM in this kernel, or not passed into this container)"
            case EACCES, EPERM: why = "\(path) refused access (\(Errno.text(-fd))); add the user to the kvm group or run as root"
            case ENXIO, ENODEV: why = "\(path) has no driver behind it (kvm module not loaded, or virtualization disabled)"
            default: why = "cannot open \(path): \(Errno.text(-fd))"
            }
            throw MachineError(.unsupported, why, operation: "open KVM")
        }
        let version = ckvm_api_version(fd)
        guard version == Self.expectedAPIVersion else {
            ckvm_close(fd)
            let got = version < 0 ? "KVM_GET_API_VERSION failed: \(Errno.text(-version))" : "API version \(version)"
            throw MachineError(.unsupported, "\(path): \(got), expected \(Self.expectedAPIVersion)", operation: "open KVM")
        }
        let size = ckvm_vcpu_mmap_size(fd)
        guard size > 0 else {
            ckvm_close(fd)
            throw MachineError(.unsupported, "\(path): KVM_GET_VCPU_MMAP_SIZE failed: \(Errno.text(-size))", operation: "open KVM")
        }
        self.fd = fd
        apiVersion = version
        vcpuMmapSize = Int(size)
    }

    deinit { ckvm_close(fd) }

    /// Whether the host KVM has capability `cap` (a `KVM_CAP_*` number): 0 if not.
    public func checkExtension(_ cap: Int32) -> Int32 { max(0, ckvm_check_extension(fd, cap)) }

    /// Creates an empty virtual machine (no memory, no vCPUs).
    /// - Throws: `.unsupported` when KVM refuses (`KVM_CREATE_VM` fails: nested
    ///   virtualization off, a sandbox's KVM without VM support), `.outOfMemory` on ENOMEM.
    public func createVirtualMachine() throws -> KVMVirtualMachine {
        let vm = ckvm_create_vm(fd)
        guard vm >= 0 else {
            throw MachineError(-vm == ENOMEM ? .outOfMemory : .unsupported,
                               "KVM_CREATE_VM failed: \(Errno.text(-vm))", operation: "create VM")
        }
        return KVMVirtualMachine(hypervisor: self, fd: vm)
    }

    /// Why KVM cannot be used here, or nil when it can: opens the device and creates
    /// (and drops) a VM. Tests call this to decide whether to skip.
    public static func unavailableReason(path: String = KVMHypervisor.defaultPath) -> String? {
        do {
            let kvm = try KVMHypervisor(path: path)
            _ = try kvm.createVirtualMachine()
            return nil
        } catch {
            return "\(error)"
        }
    }
}

/// errno values as words.
enum Errno {
    static func text(_ code: Int32) -> String { "\(String(cString: strerror(code))) (errno \(code))" }
}
