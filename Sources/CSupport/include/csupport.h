// Thin C helpers for system calls that Swift cannot call directly
// (variadic fcntl/ioctl) or whose constants are macros Swift does not import.
#ifndef QBLOCK_CSUPPORT_H
#define QBLOCK_CSUPPORT_H
#include <stdint.h>
#include <sys/types.h>
#include "qb_uring.h"

/// Open-file-description byte-range lock on one byte. `exclusive` selects F_WRLCK, else F_RDLCK.
/// Returns 0 or -errno.
int qb_ofd_lock(int fd, int64_t start, int exclusive);
/// Releases an OFD lock on one byte. Returns 0 or -errno.
int qb_ofd_unlock(int fd, int64_t start);
/// Tests whether an OFD lock on one byte would conflict. Returns 1 if another open file
/// description holds a conflicting lock, 0 if not, -errno on error.
int qb_ofd_test(int fd, int64_t start, int exclusive);
/// Size of a block device in bytes, or -errno.
int64_t qb_blkdev_size(int fd);
/// fallocate(2). Returns 0 or -errno.
int qb_fallocate(int fd, int mode, int64_t offset, int64_t length);
int qb_falloc_punch_hole(void);
int qb_falloc_zero_range(void);
int qb_falloc_keep_size(void);
int qb_o_direct(void);
int qb_seek_data(void);
int qb_seek_hole(void);
/// Whether the `len` bytes at `buf` are all zero.
int qb_buffer_is_zero(const void *buf, size_t len);
#include <stdio.h>
/// The C library's standard output and error streams. Swift 6 refuses to read the C globals
/// `stdout`/`stderr` (shared mutable state); these return the same `FILE *`.
FILE *qb_stdout(void);
FILE *qb_stderr(void);
#endif
