/* Slower storage for bench/throughput.py --fsync-delay: an LD_PRELOAD shim that makes every
 * fsync() and fdatasync() take EDGESAGA_BENCH_FSYNC_DELAY_US microseconds longer than the disk
 * underneath needs. A Raspberry Pi's SD card needs milliseconds to flush what a developer's NVMe
 * (or a VM's cached virtual disk) flushes in a fraction of one; the raw-commit reference and the
 * saga run in the same process, so both see the same slower flush. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <time.h>

static long delay_ns = -1;

static void wait_longer(void) {
    if (delay_ns < 0) { /* a race here only computes the same value twice */
        const char *text = getenv("EDGESAGA_BENCH_FSYNC_DELAY_US");
        delay_ns = text ? atol(text) * 1000L : 0;
    }
    if (delay_ns > 0) {
        struct timespec left = {delay_ns / 1000000000L, delay_ns % 1000000000L};
        while (nanosleep(&left, &left) == -1 && errno == EINTR) {
        }
    }
}

/* Calls the C library's own `name` (looked up once into *real), then waits longer. */
static int flush_then_wait(int (**real)(int), const char *name, int fd) {
    if (!*real) *real = (int (*)(int))dlsym(RTLD_NEXT, name);
    int result = (*real)(fd), saved = errno;
    wait_longer();
    errno = saved;
    return result;
}

int fsync(int fd) {
    static int (*real)(int);
    return flush_then_wait(&real, "fsync", fd);
}

int fdatasync(int fd) {
    static int (*real)(int);
    return flush_then_wait(&real, "fdatasync", fd);
}
