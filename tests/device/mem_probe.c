// How fast THREADS threads can stream a model's bytes, by where the bytes
// live: (1) the GGUF mapped from the page cache (how both runtimes read
// weights by default), (2) an anonymous copy in 4 KB pages, each thread
// writing its own slice first (first touch places pages on its NUMA node),
// (3) the same with transparent huge pages. Each thread sums its contiguous
// 1/THREADS of the bytes with 256-bit loads, as a decode step reads weights;
// the best of 5 passes after a warm one is printed.
//   cc -O2 -mavx2 -pthread mem_probe.c -o mem_probe && ./mem_probe FILE THREADS
#define _GNU_SOURCE
#include <fcntl.h>
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static const char *base;
static size_t len;
static int threads;
static pthread_barrier_t bar;
static long long sink;

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static void *run(void *arg) {
  long i = (long)arg;
  size_t per = (len / threads) & ~(size_t)63, lo = i * per;
  __m256i acc = _mm256_setzero_si256();
  for (int pass = 0; pass < 6; pass++) {
    pthread_barrier_wait(&bar);
    for (size_t at = lo; at < lo + per; at += 64) {
      acc = _mm256_add_epi8(acc, _mm256_loadu_si256((const __m256i *)(base + at)));
      acc = _mm256_add_epi8(acc, _mm256_loadu_si256((const __m256i *)(base + at + 32)));
    }
    pthread_barrier_wait(&bar);
  }
  // Every lane kept, so every load is needed.
  long long lanes[4];
  _mm256_storeu_si256((__m256i *)lanes, acc);
  __atomic_fetch_add(&sink, lanes[0] ^ lanes[1] ^ lanes[2] ^ lanes[3], __ATOMIC_RELAXED);
  return NULL;
}

static void *touch(void *arg) {
  long i = (long)arg;
  size_t per = (len / threads) & ~(size_t)63, lo = i * per;
  memset((char *)base + lo, 1, i == threads - 1 ? len - lo : per);
  return NULL;
}

static void measure(const char *what) {
  pthread_t t[256];
  pthread_barrier_init(&bar, NULL, threads + 1);
  for (long i = 0; i < threads; i++)
    if (pthread_create(&t[i], NULL, run, (void *)i)) return perror("pthread_create"), exit(1);
  double best = 0;
  for (int pass = 0; pass < 6; pass++) {
    pthread_barrier_wait(&bar);
    double t0 = now();
    pthread_barrier_wait(&bar);
    double gbs = len / (now() - t0) / 1e9;
    if (pass > 0 && gbs > best) best = gbs;
  }
  for (int i = 0; i < threads; i++) pthread_join(t[i], NULL);
  pthread_barrier_destroy(&bar);
  printf("%-44s %2d threads  %7.1f GB/s\n", what, threads, best);
}

static char *anon(int huge) {
  char *p = aligned_alloc(1 << 21, len);  // len is a multiple of 2 MB
  if (!p) {
    perror("aligned_alloc");
    exit(1);
  }
  if (madvise(p, len, huge ? MADV_HUGEPAGE : MADV_NOHUGEPAGE))
    perror("madvise (the huge-page row may be 4 KB pages)");
  base = p;
  pthread_t t[256];
  for (long i = 0; i < threads; i++)
    if (pthread_create(&t[i], NULL, touch, (void *)i)) perror("pthread_create"), exit(1);
  for (int i = 0; i < threads; i++) pthread_join(t[i], NULL);
  return p;
}

int main(int argc, char **argv) {
  if (argc < 3) return 2;
  threads = atoi(argv[2]);
  if (threads < 1 || threads > 256) return 2;
  int fd = open(argv[1], O_RDONLY);
  struct stat st;
  if (fd < 0 || fstat(fd, &st)) return perror(argv[1]), 1;
  len = st.st_size & ~(size_t)((1 << 21) - 1);
  base = mmap(NULL, len, PROT_READ, MAP_PRIVATE | MAP_POPULATE, fd, 0);
  if (base == MAP_FAILED) return perror("mmap"), 1;
  measure("mapped file (page cache)");
  munmap((void *)base, len);
  // The same mapping asking for huge pages: a read-only file's page cache
  // can be mapped by 2 MB entries where the kernel supports it (large
  // folios, CONFIG_READ_ONLY_THP_FOR_FS); MADV_COLLAPSE (Linux 6.1) makes
  // them now. FilePmdMapped says how much of the process is mapped so.
  base = mmap(NULL, len, PROT_READ, MAP_PRIVATE, fd, 0);
  if (base == MAP_FAILED) return perror("mmap"), 1;
  if (madvise((void *)base, len, MADV_HUGEPAGE)) perror("madvise(MADV_HUGEPAGE)");
#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25
#endif
  double c0 = now();
  if (madvise((void *)base, len, MADV_COLLAPSE)) perror("madvise(MADV_COLLAPSE)");
  printf("MADV_COLLAPSE took %.2f s\n", now() - c0);
  measure("mapped file, MADV_HUGEPAGE + MADV_COLLAPSE");
  fflush(stdout);
  system("grep FilePmdMapped /proc/$PPID/smaps_rollup");
  munmap((void *)base, len);
  char *p = anon(0);
  measure("anonymous, 4 KB pages, first touch by thread");
  free(p);
  p = anon(1);
  measure("anonymous, huge pages, first touch by thread");
  printf("(transparent huge pages: ");
  fflush(stdout);
  system("cat /sys/kernel/mm/transparent_hugepage/enabled; grep AnonHugePages /proc/meminfo");
  printf(")\n");
  free(p);
  return 0;
}
