/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * tsc_hz: the host's TSC rate in Hz, measured against CLOCK_MONOTONIC_RAW
 * over about 200 ms (the median of five 40 ms spans).  KVM guests read
 * the same counter (no TSC scaling), so bench/disk turns the test guest's
 * cycle counts into seconds with it.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define SPANS 5
#define SPAN_NS 40000000LL

static uint64_t rdtsc(void)
{
	uint32_t lo, hi;

	__asm__ volatile("lfence; rdtsc" : "=a"(lo), "=d"(hi));
	return (uint64_t)hi << 32 | lo;
}

static int64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC_RAW, &ts);
	return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int by_value(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return (x > y) - (x < y);
}

int main(void)
{
	double hz[SPANS];
	int i;

	for (i = 0; i < SPANS; i++) {
		int64_t t0 = now_ns(), t1;
		uint64_t c0 = rdtsc(), c1;

		while ((t1 = now_ns()) - t0 < SPAN_NS)
			;
		c1 = rdtsc();
		hz[i] = (double)(c1 - c0) * 1e9 / (double)(t1 - t0);
	}
	qsort(hz, SPANS, sizeof(hz[0]), by_value);
	printf("%.0f\n", hz[SPANS / 2]);
	return 0;
}
