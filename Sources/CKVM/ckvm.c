// CKVM: thin wrappers over the KVM ioctls; see include/ckvm.h.
#define _GNU_SOURCE
#include "ckvm.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

static int result(int rc) { return rc < 0 ? -errno : rc; }

int ckvm_open(const char *path) { return result(open(path, O_RDWR | O_CLOEXEC)); }
void ckvm_close(int fd) { if (fd >= 0) close(fd); }
int ckvm_api_version(int kvm) { return result(ioctl(kvm, KVM_GET_API_VERSION, 0)); }
int ckvm_check_extension(int kvm, int capability) {
    return result(ioctl(kvm, KVM_CHECK_EXTENSION, capability));
}

int ckvm_create_vm(int kvm) {
    int rc;
    // KVM_CREATE_VM can fail with EINTR on some kernels while the VM's page tables are set up.
    do { rc = ioctl(kvm, KVM_CREATE_VM, 0); } while (rc < 0 && errno == EINTR);
    return result(rc);
}

int ckvm_set_memory_region(int vm, uint32_t slot, uint32_t flags, uint64_t guest_phys,
                           uint64_t size, void *host) {
    struct kvm_userspace_memory_region r = {
        .slot = slot, .flags = flags, .guest_phys_addr = guest_phys,
        .memory_size = size, .userspace_addr = (uint64_t)(uintptr_t)host,
    };
    return result(ioctl(vm, KVM_SET_USER_MEMORY_REGION, &r));
}

int ckvm_create_vcpu(int vm, int id) { return result(ioctl(vm, KVM_CREATE_VCPU, id)); }
int ckvm_vcpu_mmap_size(int kvm) { return result(ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0)); }

struct kvm_run *ckvm_map_run(int vcpu, size_t size, int *err) {
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (p == MAP_FAILED) { *err = -errno; return NULL; }
    *err = 0;
    return p;
}

void ckvm_unmap_run(struct kvm_run *run, size_t size) { if (run) munmap(run, size); }

int ckvm_set_supported_cpuid(int kvm, int vcpu) {
    // The entry count is not known in advance: grow until the kernel stops saying E2BIG.
    for (int n = 64; n <= 4096; n *= 2) {
        struct kvm_cpuid2 *c = calloc(1, sizeof *c + (size_t)n * sizeof(struct kvm_cpuid_entry2));
        if (!c) return -ENOMEM;
        c->nent = (uint32_t)n;
        if (ioctl(kvm, KVM_GET_SUPPORTED_CPUID, c) < 0) {
            int e = errno;
            free(c);
            if (e == E2BIG) continue;
            return -e;
        }
        int rc = result(ioctl(vcpu, KVM_SET_CPUID2, c));
        free(c);
        return rc;
    }
    return -E2BIG;
}

int ckvm_get_regs(int vcpu, struct kvm_regs *regs) { return result(ioctl(vcpu, KVM_GET_REGS, regs)); }
int ckvm_set_regs(int vcpu, const struct kvm_regs *regs) { return result(ioctl(vcpu, KVM_SET_REGS, regs)); }
int ckvm_get_sregs(int vcpu, struct kvm_sregs *sregs) { return result(ioctl(vcpu, KVM_GET_SREGS, sregs)); }
int ckvm_set_sregs(int vcpu, const struct kvm_sregs *sregs) { return result(ioctl(vcpu, KVM_SET_SREGS, sregs)); }
int ckvm_run(int vcpu) { return result(ioctl(vcpu, KVM_RUN, 0)); }

uint32_t ckvm_run_exit_reason(const struct kvm_run *run) { return run->exit_reason; }
void ckvm_run_set_immediate_exit(struct kvm_run *run, uint8_t value) {
    __atomic_store_n(&run->immediate_exit, value, __ATOMIC_SEQ_CST);
}

void ckvm_run_io(const struct kvm_run *run, uint8_t *direction, uint8_t *size,
                 uint16_t *port, uint32_t *count) {
    *direction = run->io.direction;
    *size = run->io.size;
    *port = run->io.port;
    *count = run->io.count;
}

uint8_t *ckvm_run_io_data(struct kvm_run *run) { return (uint8_t *)run + run->io.data_offset; }

void ckvm_run_mmio(const struct kvm_run *run, uint64_t *phys_addr, uint32_t *len,
                   uint8_t *is_write) {
    *phys_addr = run->mmio.phys_addr;
    *len = run->mmio.len;
    *is_write = run->mmio.is_write;
}

uint8_t *ckvm_run_mmio_data(struct kvm_run *run) { return run->mmio.data; }

uint64_t ckvm_run_fail_entry_reason(const struct kvm_run *run) {
    return run->fail_entry.hardware_entry_failure_reason;
}

uint32_t ckvm_run_internal_suberror(const struct kvm_run *run) { return run->internal.suberror; }

uint32_t ckvm_run_internal_data(const struct kvm_run *run, uint64_t *data, uint32_t max) {
    uint32_t n = run->internal.ndata;
    if (n > 16) n = 16;
    if (n > max) n = max;
    for (uint32_t i = 0; i < n; i++) data[i] = run->internal.data[i];
    return n;
}

uint32_t ckvm_run_system_event_type(const struct kvm_run *run) { return run->system_event.type; }

int ckvm_kick_signal(void) { return SIGRTMIN + 4; }

static void kick_handler(int signo) { (void)signo; }

int ckvm_install_kick_handler(int signo) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = kick_handler;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0; // no SA_RESTART: KVM_RUN must come back with EINTR
    return result(sigaction(signo, &sa, NULL));
}

uint64_t ckvm_current_thread(void) { return (uint64_t)pthread_self(); }

int ckvm_kick(uint64_t thread, int signo) {
    int rc = pthread_kill((pthread_t)thread, signo);
    return rc ? -rc : 0;
}

int ckvm_unblock_signal(int signo) {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, signo);
    int rc = pthread_sigmask(SIG_UNBLOCK, &set, NULL);
    return rc ? -rc : 0;
}
