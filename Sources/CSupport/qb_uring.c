#define _GNU_SOURCE
#include "qb_uring.h"
#include <errno.h>
#include <linux/io_uring.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

struct qb_uring {
    int fd;
    pthread_mutex_t lock;
    /* submission queue */
    unsigned *sq_head, *sq_tail, *sq_mask, *sq_array;
    unsigned sq_entries;
    struct io_uring_sqe *sqes;
    /* completion queue */
    unsigned *cq_head, *cq_tail, *cq_mask;
    struct io_uring_cqe *cqes;
    void *sq_ptr, *cq_ptr;
    size_t sq_size, cq_size, sqes_size;
};

static int sys_setup(unsigned entries, struct io_uring_params *p) {
    return (int)syscall(__NR_io_uring_setup, entries, p);
}

static int sys_enter(int fd, unsigned submit, unsigned complete, unsigned flags) {
    return (int)syscall(__NR_io_uring_enter, fd, submit, complete, flags, NULL, 0);
}

qb_uring *qb_uring_create(unsigned entries) {
    struct io_uring_params p;
    memset(&p, 0, sizeof(p));
    int fd = sys_setup(entries, &p);
    if (fd < 0) return NULL;
    qb_uring *r = calloc(1, sizeof(*r));
    if (!r) { close(fd); errno = ENOMEM; return NULL; }
    r->fd = fd;
    pthread_mutex_init(&r->lock, NULL);
    r->sq_size = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    r->cq_size = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    int single = (p.features & IORING_FEAT_SINGLE_MMAP) != 0;
    if (single) {
        if (r->cq_size > r->sq_size) r->sq_size = r->cq_size;
        r->cq_size = r->sq_size;
    }
    r->sq_ptr = mmap(NULL, r->sq_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQ_RING);
    if (r->sq_ptr == MAP_FAILED) goto fail;
    r->cq_ptr = single ? r->sq_ptr
        : mmap(NULL, r->cq_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_CQ_RING);
    if (r->cq_ptr == MAP_FAILED) goto fail;
    r->sqes_size = p.sq_entries * sizeof(struct io_uring_sqe);
    r->sqes = mmap(NULL, r->sqes_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQES);
    if (r->sqes == MAP_FAILED) goto fail;
    char *sq = r->sq_ptr, *cq = r->cq_ptr;
    r->sq_head = (unsigned *)(sq + p.sq_off.head);
    r->sq_tail = (unsigned *)(sq + p.sq_off.tail);
    r->sq_mask = (unsigned *)(sq + p.sq_off.ring_mask);
    r->sq_array = (unsigned *)(sq + p.sq_off.array);
    r->sq_entries = p.sq_entries;
    r->cq_head = (unsigned *)(cq + p.cq_off.head);
    r->cq_tail = (unsigned *)(cq + p.cq_off.tail);
    r->cq_mask = (unsigned *)(cq + p.cq_off.ring_mask);
    r->cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
    return r;
fail:
    close(fd);
    free(r);
    errno = ENOMEM;
    return NULL;
}

int qb_uring_submit(qb_uring *r, int op, int fd, void *buf, uint32_t len, int64_t offset, uint64_t user_data,
                    int try_only) {
    if (try_only) {
        if (pthread_mutex_trylock(&r->lock) != 0) return QB_URING_BUSY;
    } else {
        pthread_mutex_lock(&r->lock);
    }
    unsigned tail = *r->sq_tail;
    unsigned head = __atomic_load_n(r->sq_head, __ATOMIC_ACQUIRE);
    if (tail - head >= r->sq_entries) {
        pthread_mutex_unlock(&r->lock);
        return -EBUSY;
    }
    unsigned idx = tail & *r->sq_mask;
    struct io_uring_sqe *sqe = &r->sqes[idx];
    memset(sqe, 0, sizeof(*sqe));
    sqe->fd = fd;
    sqe->off = (uint64_t)offset;
    sqe->addr = (uint64_t)(uintptr_t)buf;
    sqe->len = len;
    sqe->user_data = user_data;
    switch (op) {
    case QB_URING_READ: sqe->opcode = IORING_OP_READ; break;
    case QB_URING_WRITE: sqe->opcode = IORING_OP_WRITE; break;
    default: sqe->opcode = IORING_OP_FSYNC; sqe->fsync_flags = IORING_FSYNC_DATASYNC; break;
    }
    r->sq_array[idx] = idx;
    __atomic_store_n(r->sq_tail, tail + 1, __ATOMIC_RELEASE);
    int ret;
    do { ret = sys_enter(r->fd, 1, 0, 0); } while (ret < 0 && errno == EINTR);
    int err = ret < 0 ? -errno : 0;
    if (ret < 0) {
        /* Not consumed: take the entry back so the caller can fall back. */
        if (__atomic_load_n(r->sq_head, __ATOMIC_ACQUIRE) == tail) {
            __atomic_store_n(r->sq_tail, tail, __ATOMIC_RELEASE);
        } else {
            err = 0; /* the kernel consumed it after all; its completion will arrive */
        }
    }
    pthread_mutex_unlock(&r->lock);
    return err;
}

int qb_uring_wait(qb_uring *r, uint64_t *user_data, int32_t *result) {
    for (;;) {
        unsigned head = *r->cq_head;
        unsigned tail = __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE);
        if (head != tail) {
            struct io_uring_cqe *cqe = &r->cqes[head & *r->cq_mask];
            *user_data = cqe->user_data;
            *result = cqe->res;
            __atomic_store_n(r->cq_head, head + 1, __ATOMIC_RELEASE);
            return 0;
        }
        int ret = sys_enter(r->fd, 0, 1, IORING_ENTER_GETEVENTS);
        if (ret < 0 && errno != EINTR && errno != EAGAIN && errno != EBUSY) return -errno;
    }
}
