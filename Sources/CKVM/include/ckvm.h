// CKVM: the few KVM ioctls QMachine's KVM accelerator needs, as plain C functions.
//
// Every function returns a non-negative value on success and -errno on failure, so the
// Swift side never reads errno after the fact. The kvm_run page is reached only through
// the ckvm_run_* accessors: Swift never depends on the layout of its exit union.
#ifndef CKVM_H
#define CKVM_H

#include <stdint.h>
#include <stddef.h>
#include <linux/kvm.h>

#ifdef __cplusplus
extern "C" {
#endif

/// Opens /dev/kvm (read-write, close-on-exec). Returns the descriptor or -errno.
int ckvm_open(const char *path);
/// Closes a descriptor.
void ckvm_close(int fd);
/// KVM_GET_API_VERSION (12 on every kernel since 2.6.22).
int ckvm_api_version(int kvm);
/// KVM_CHECK_EXTENSION.
int ckvm_check_extension(int kvm, int capability);
/// KVM_CREATE_VM (default machine type). Returns the VM descriptor or -errno.
int ckvm_create_vm(int kvm);
/// KVM_SET_USER_MEMORY_REGION.
int ckvm_set_memory_region(int vm, uint32_t slot, uint32_t flags, uint64_t guest_phys,
                           uint64_t size, void *host);
/// KVM_CREATE_VCPU. Returns the vCPU descriptor or -errno.
int ckvm_create_vcpu(int vm, int id);
/// KVM_GET_VCPU_MMAP_SIZE.
int ckvm_vcpu_mmap_size(int kvm);
/// Maps a vCPU's kvm_run page(s). Returns NULL (and sets *err to -errno) on failure.
struct kvm_run *ckvm_map_run(int vcpu, size_t size, int *err);
/// Unmaps what ckvm_map_run mapped.
void ckvm_unmap_run(struct kvm_run *run, size_t size);
/// KVM_GET_SUPPORTED_CPUID on the system descriptor then KVM_SET_CPUID2 on the vCPU:
/// the guest sees what the host KVM supports (long mode among it).
int ckvm_set_supported_cpuid(int kvm, int vcpu);
int ckvm_get_regs(int vcpu, struct kvm_regs *regs);
int ckvm_set_regs(int vcpu, const struct kvm_regs *regs);
int ckvm_get_sregs(int vcpu, struct kvm_sregs *sregs);
int ckvm_set_sregs(int vcpu, const struct kvm_sregs *sregs);
/// KVM_RUN. Returns 0 on an exit to user space, -EINTR when a signal (or immediate_exit)
/// interrupted it, another -errno on failure.
int ckvm_run(int vcpu);

// --- kvm_run accessors -------------------------------------------------------------

uint32_t ckvm_run_exit_reason(const struct kvm_run *run);
void ckvm_run_set_immediate_exit(struct kvm_run *run, uint8_t value);

/// KVM_EXIT_IO: direction (0 in, 1 out), access size, port, repeat count.
void ckvm_run_io(const struct kvm_run *run, uint8_t *direction, uint8_t *size,
                 uint16_t *port, uint32_t *count);
/// KVM_EXIT_IO: the data bytes (count * size of them) inside the kvm_run mapping.
uint8_t *ckvm_run_io_data(struct kvm_run *run);

/// KVM_EXIT_MMIO: guest-physical address, length (1..8), direction.
void ckvm_run_mmio(const struct kvm_run *run, uint64_t *phys_addr, uint32_t *len,
                   uint8_t *is_write);
/// KVM_EXIT_MMIO: the 8 data bytes.
uint8_t *ckvm_run_mmio_data(struct kvm_run *run);

/// KVM_EXIT_FAIL_ENTRY: the hardware's entry failure reason.
uint64_t ckvm_run_fail_entry_reason(const struct kvm_run *run);
/// KVM_EXIT_INTERNAL_ERROR: the suberror (KVM_INTERNAL_ERROR_EMULATION, ...).
uint32_t ckvm_run_internal_suberror(const struct kvm_run *run);
/// KVM_EXIT_INTERNAL_ERROR: copies up to `max` data words; returns how many.
uint32_t ckvm_run_internal_data(const struct kvm_run *run, uint64_t *data, uint32_t max);
/// KVM_EXIT_SYSTEM_EVENT: the event type (KVM_SYSTEM_EVENT_SHUTDOWN, _RESET, _CRASH).
uint32_t ckvm_run_system_event_type(const struct kvm_run *run);

// --- stopping a vCPU thread blocked in KVM_RUN -------------------------------------

/// The signal QMachine uses to kick vCPU threads out of KVM_RUN (SIGRTMIN + 4, clear of
/// glibc's and the Swift runtime's own).
int ckvm_kick_signal(void);
/// Installs a do-nothing handler for `signo` without SA_RESTART, so delivering it to a
/// thread blocked in KVM_RUN makes the ioctl return -EINTR. Idempotent.
int ckvm_install_kick_handler(int signo);
/// The calling thread's identity, for ckvm_kick.
uint64_t ckvm_current_thread(void);
/// Sends `signo` to a thread obtained from ckvm_current_thread.
int ckvm_kick(uint64_t thread, int signo);
/// Unblocks `signo` in the calling thread's signal mask.
int ckvm_unblock_signal(int signo);

#ifdef __cplusplus
}
#endif
#endif
