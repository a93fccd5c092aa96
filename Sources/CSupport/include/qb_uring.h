// A minimal io_uring ring on raw system calls (no liburing), for positional reads,
// writes and fdatasync. Submission is thread-safe; one thread reaps completions.
#ifndef QBLOCK_URING_H
#define QBLOCK_URING_H
#include <stdint.h>

typedef struct qb_uring qb_uring;

enum { QB_URING_READ = 0, QB_URING_WRITE = 1, QB_URING_FDATASYNC = 2 };

/// Creates a ring with `entries` submission slots. Returns NULL (and sets errno) when the
/// kernel refuses io_uring (ENOSYS, EPERM in sandboxes...).
qb_uring *qb_uring_create(unsigned entries);
/// Returned by a `try_only` submission when another thread is submitting to the ring.
enum { QB_URING_BUSY = 1 };
/// Queues and submits one request. Returns 0, or -EBUSY when the submission queue is full
/// (the caller should fall back), or another -errno. The ring's lock is held while the
/// kernel takes the request, which includes any work it does inline (a buffered read or
/// write copies through the page cache right there); with `try_only` set, a ring whose lock
/// is taken is left alone and QB_URING_BUSY returned, so the caller can use another ring.
int qb_uring_submit(qb_uring *r, int op, int fd, void *buf, uint32_t len, int64_t offset, uint64_t user_data,
                    int try_only);
/// Blocks until a completion is available and returns it. Returns 0 or -errno.
int qb_uring_wait(qb_uring *r, uint64_t *user_data, int32_t *result);
#endif
