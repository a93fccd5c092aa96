#define _GNU_SOURCE
#include "csupport.h"
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <linux/fs.h>
#include <linux/falloc.h>

static int ofd_lock_op(int fd, int cmd, short type, int64_t start, struct flock *fl) {
    memset(fl, 0, sizeof(*fl));
    fl->l_whence = SEEK_SET;
    fl->l_start = start;
    fl->l_len = 1;
    fl->l_type = type;
    int r;
    do { r = fcntl(fd, cmd, fl); } while (r == -1 && errno == EINTR);
    return r == -1 ? -errno : 0;
}

int qb_ofd_lock(int fd, int64_t start, int exclusive) {
    struct flock fl;
    return ofd_lock_op(fd, F_OFD_SETLK, exclusive ? F_WRLCK : F_RDLCK, start, &fl);
}

int qb_ofd_unlock(int fd, int64_t start) {
    struct flock fl;
    return ofd_lock_op(fd, F_OFD_SETLK, F_UNLCK, start, &fl);
}

int qb_ofd_test(int fd, int64_t start, int exclusive) {
    struct flock fl;
    int r = ofd_lock_op(fd, F_OFD_GETLK, exclusive ? F_WRLCK : F_RDLCK, start, &fl);
    if (r < 0) return r;
    return fl.l_type == F_UNLCK ? 0 : 1;
}

int64_t qb_blkdev_size(int fd) {
    uint64_t size = 0;
    if (ioctl(fd, BLKGETSIZE64, &size) == -1) return -errno;
    return (int64_t)size;
}

int qb_fallocate(int fd, int mode, int64_t offset, int64_t length) {
    int r;
    do { r = fallocate(fd, mode, offset, length); } while (r == -1 && errno == EINTR);
    return r == -1 ? -errno : 0;
}

int qb_falloc_punch_hole(void) { return FALLOC_FL_PUNCH_HOLE; }
int qb_falloc_zero_range(void) { return FALLOC_FL_ZERO_RANGE; }
int qb_falloc_keep_size(void) { return FALLOC_FL_KEEP_SIZE; }
int qb_o_direct(void) { return O_DIRECT; }
int qb_seek_data(void) { return SEEK_DATA; }
int qb_seek_hole(void) { return SEEK_HOLE; }

FILE *qb_stdout(void) { return stdout; }
FILE *qb_stderr(void) { return stderr; }
