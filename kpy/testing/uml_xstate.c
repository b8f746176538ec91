/*
 * Let Debian's User-Mode Linux 6.1 run on hosts whose XSAVE area is larger than its
 * buffer (CPUs with AMX, e.g. Sapphire Rapids): preloaded into the UML process
 * (LD_PRELOAD, see kpy/testing/uml.py), it wraps ptrace(2).
 *
 * UML saves and restores each guest thread's FPU state with PTRACE_GETREGSET and
 * PTRACE_SETREGSET (NT_X86_XSTATE) into a fixed-size buffer. The host kernel fills a
 * short buffer on GET (truncated), but refuses a SET whose size is not the full XSAVE
 * size with EFAULT ("ptrace set fp regs failed, errno = 14": the guest's init dies).
 *
 * Here a GET reads the whole area, gives UML the part that fits and keeps the whole
 * area aside, keyed by UML's buffer (one per guest thread). A SET shorter than the full
 * size takes the kept area (or the thread's current one), lays UML's part over it, keeps
 * the kept components' presence bits for the part UML cannot hold, and writes the whole
 * area. Every other ptrace request goes to libc unchanged. Nothing here runs outside the
 * UML process that the tests start.
 */
#define _GNU_SOURCE
#include <cpuid.h>
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#define XSTATE_NOTE 0x202 /* NT_X86_XSTATE */
#define XSTATE_BV 512     /* offset of the header's xstate_bv */
#define MAX_AREA 65536
#define SLOTS 4096

struct kept {
    const void *key;
    size_t size;
    unsigned char *area;
};

static struct kept kept[SLOTS];
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static size_t full_size;

static long raw(long request, pid_t pid, void *addr, void *data)
{
    return syscall(SYS_ptrace, request, pid, addr, data);
}

static struct kept *slot(const void *key, int create)
{
    size_t h = ((uintptr_t)key >> 4) % SLOTS;
    for (size_t i = 0; i < SLOTS; i++) {
        struct kept *k = &kept[(h + i) % SLOTS];
        if (k->key == key)
            return k;
        if (k->key == NULL) {
            if (!create)
                return NULL;
            k->key = key;
            return k;
        }
    }
    return NULL;
}

/* Presence bits of the components that start at or beyond `len` bytes (CPUID is slow
 * in a virtual machine: asked once per length). */
static uint64_t beyond(size_t len)
{
    static size_t cached_len;
    static uint64_t cached_mask;
    uint64_t mask = 0;
    if (cached_len == len && len != 0)
        return cached_mask;
    for (unsigned int i = 2; i < 63; i++) {
        unsigned int size, offset, c, d;
        __cpuid_count(0xd, i, size, offset, c, d);
        (void)c;
        (void)d;
        if (size != 0 && offset != 0 && offset >= len)
            mask |= (uint64_t)1 << i;
    }
    cached_len = len;
    cached_mask = mask;
    return mask;
}

static unsigned char scratch[MAX_AREA]; /* used under `lock` */

static long get_full(pid_t pid, unsigned char *area, size_t *size)
{
    struct iovec iov = {area, MAX_AREA};
    long r = raw(PTRACE_GETREGSET, pid, (void *)XSTATE_NOTE, &iov);
    if (r == 0) {
        *size = iov.iov_len;
        full_size = iov.iov_len;
    }
    return r;
}

static long get_xstate(pid_t pid, struct iovec *iov)
{
    size_t size = 0;
    long r;
    pthread_mutex_lock(&lock);
    r = get_full(pid, scratch, &size);
    if (r == 0) {
        size_t n = iov->iov_len < size ? iov->iov_len : size;
        memcpy(iov->iov_base, scratch, n);
        iov->iov_len = n;
        if (n < size) {
            struct kept *k = slot(iov->iov_base, 1);
            if (k != NULL && k->size != size) {
                free(k->area);
                k->area = malloc(size);
                k->size = k->area != NULL ? size : 0;
            }
            if (k != NULL && k->area != NULL)
                memcpy(k->area, scratch, size);
        }
    }
    pthread_mutex_unlock(&lock);
    return r;
}

static long set_xstate(pid_t pid, struct iovec *iov)
{
    size_t size = 0, len = iov->iov_len;
    uint64_t bv, kept_bv = 0, mask;
    struct iovec full;
    long r;
    if ((full_size != 0 && len >= full_size) || len < XSTATE_BV + 8)
        return raw(PTRACE_SETREGSET, pid, (void *)XSTATE_NOTE, iov);
    pthread_mutex_lock(&lock);
    struct kept *k = slot(iov->iov_base, 0);
    if (k != NULL && k->area != NULL) {
        memcpy(scratch, k->area, k->size);
        size = k->size;
        memcpy(&kept_bv, scratch + XSTATE_BV, 8);
    } else {
        /* Nothing kept: the components UML cannot hold start from their init state. */
        r = get_full(pid, scratch, &size);
        if (r != 0) {
            pthread_mutex_unlock(&lock);
            return r;
        }
    }
    if (len >= size) {
        pthread_mutex_unlock(&lock);
        return raw(PTRACE_SETREGSET, pid, (void *)XSTATE_NOTE, iov);
    }
    memcpy(scratch, iov->iov_base, len);
    mask = beyond(len);
    memcpy(&bv, scratch + XSTATE_BV, 8);
    bv = (bv & ~mask) | (kept_bv & mask);
    memcpy(scratch + XSTATE_BV, &bv, 8);
    full.iov_base = scratch;
    full.iov_len = size;
    r = raw(PTRACE_SETREGSET, pid, (void *)XSTATE_NOTE, &full);
    pthread_mutex_unlock(&lock);
    return r;
}

long ptrace(enum __ptrace_request request, ...)
{
    static long (*next)(enum __ptrace_request, ...);
    va_list ap;
    pid_t pid;
    void *addr, *data;

    va_start(ap, request);
    pid = va_arg(ap, pid_t);
    addr = va_arg(ap, void *);
    data = va_arg(ap, void *);
    va_end(ap);

    if ((request == PTRACE_GETREGSET || request == PTRACE_SETREGSET) &&
        (uintptr_t)addr == XSTATE_NOTE && data != NULL) {
        if (request == PTRACE_GETREGSET)
            return get_xstate(pid, data);
        return set_xstate(pid, data);
    }
    if (next == NULL)
        next = (long (*)(enum __ptrace_request, ...))dlsym(RTLD_NEXT, "ptrace");
    return next(request, pid, addr, data);
}
