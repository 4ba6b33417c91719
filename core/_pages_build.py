# SPDX-License-Identifier: BSD-2-Clause
"""cffi build script for ``hvf._pages``: page scans too hot for a Python loop.

Saving guest RAM looks at every page that may hold data (gigabytes) to leave zero
pages out, and a copy-on-write guest's ``/proc/self/pagemap`` has one entry per page.
Both scans return one run of pages per call; cffi releases the GIL around them.
"""

from __future__ import annotations

from cffi import FFI

CDEF = """
#define HVF_PAGE_SIZE ...
#define HVF_PM_PRESENT ...
#define HVF_PM_SWAPPED ...
#define HVF_PM_FILE ...
size_t hvf_nonzero_run(const unsigned char *base, size_t npages, size_t from, size_t *end);
size_t hvf_private_run(const uint64_t *entries, size_t n, size_t from, size_t *end);
"""

SOURCE = r"""
#include <stddef.h>
#include <stdint.h>

#define HVF_PAGE_SIZE 4096
/* /proc/PID/pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst). */
#define HVF_PM_PRESENT (1ULL << 63)
#define HVF_PM_SWAPPED (1ULL << 62)
#define HVF_PM_FILE (1ULL << 61)

static int page_is_zero(const unsigned char *page)
{
    const uint64_t *w = (const uint64_t *)page;
    /* Data pages usually differ from zero in their first bytes: look there first. */
    if (w[0] | w[1] | w[2] | w[3])
        return 0;
    for (size_t i = 0; i < HVF_PAGE_SIZE / 8; i += 8) {
        uint64_t acc = 0;
        for (size_t j = 0; j < 8; j++)
            acc |= w[i + j];
        if (acc)
            return 0;
    }
    return 1;
}

/*
 * Pages [from, npages) of base: the index of the first one holding a non-zero byte
 * (npages if none); *end is set to the first zero page after it (or npages).
 */
static size_t hvf_nonzero_run(const unsigned char *base, size_t npages, size_t from,
                              size_t *end)
{
    size_t i = from;
    while (i < npages && page_is_zero(base + i * HVF_PAGE_SIZE))
        i++;
    size_t j = i;
    while (j < npages && !page_is_zero(base + j * HVF_PAGE_SIZE))
        j++;
    *end = j;
    return i;
}

/* A page of a MAP_PRIVATE file mapping that the process has its own copy of. */
static int is_private(uint64_t e)
{
    return (e & HVF_PM_SWAPPED) || ((e & HVF_PM_PRESENT) && !(e & HVF_PM_FILE));
}

/* As hvf_nonzero_run, over pagemap entries: the next run of privately held pages. */
static size_t hvf_private_run(const uint64_t *entries, size_t n, size_t from, size_t *end)
{
    size_t i = from;
    while (i < n && !is_private(entries[i]))
        i++;
    size_t j = i;
    while (j < n && is_private(entries[j]))
        j++;
    *end = j;
    return i;
}
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("hvf._pages", SOURCE)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
