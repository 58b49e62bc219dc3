// Workload for user-space unwinding: every wait goes through libc and the spin reads the clock
// through the vDSO, as ordinary programs do (no raw `syscall` instructions). The tests build it
// without frame pointers (-O2 -fomit-frame-pointer), with frame pointers (the dropped-caller
// case: libc has none, so a frame-pointer walk loses the function that called it), without
// unwind tables, and stripped.
//
//   main → request → sleep_step → nanosleep()          (libc)
//   main → request → read_step  → read() on a pipe     (libc; a thread writes every 20 ms)
//   main → spin_clock → clock_gettime()                (libc → vDSO), on-CPU
//
// Prints "ready PID", waits for a line on stdin, works, then prints its own measurements
// (CLOCK_MONOTONIC around each libc call, summed per function; the thread's CPU time around
// the spins), one "name value" per line, then "done". These are the tests' oracle.
//
// Usage: unwind_blocking ITERATIONS SPINS   (ITERATIONS requests of a 10 ms sleep and a pipe
// read; SPINS spins of 100 ms)
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

// noipa: neither inlined nor cloned (no `request.constprop.0`), so each function is a frame
// under its own name. Each function does work after its call, so no call is a tail call.
#define FRAME __attribute__((noipa))

static int pipe_fds[2];
static int iterations;
static long long sleep_step_ns, read_step_ns;
static volatile long long spin_reads;

static long long clock_ns(clockid_t clock) {
  struct timespec ts;
  clock_gettime(clock, &ts);
  return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

FRAME static void sleep_step(long ms) {
  struct timespec ts = {0, ms * 1000000L};
  long long start = clock_ns(CLOCK_MONOTONIC);
  nanosleep(&ts, NULL);
  sleep_step_ns += clock_ns(CLOCK_MONOTONIC) - start;
}

FRAME static void read_step(void) {
  char byte;
  long long start = clock_ns(CLOCK_MONOTONIC);
  if (read(pipe_fds[0], &byte, 1) != 1) {
    perror("read");
    exit(1);
  }
  read_step_ns += clock_ns(CLOCK_MONOTONIC) - start;
}

FRAME static int request(int i) {
  sleep_step(10);
  read_step();
  return i + 1;
}

// Reads the clock until `ms` have passed: nearly all of its time is in the vDSO and libc's
// clock_gettime, called from here.
FRAME static long long spin_clock(long ms) {
  long long start = clock_ns(CLOCK_MONOTONIC);
  long long end = start + ms * 1000000LL;
  long long now;
  long long reads = 0;
  do {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    now = ts.tv_sec * 1000000000LL + ts.tv_nsec;
    reads++;
  } while (now < end);
  spin_reads += reads;
  return now - start;
}

FRAME static void *feed_pipe(void *unused) {
  (void)unused;
  struct timespec ts = {0, 20 * 1000000L};
  for (int i = 0; i < iterations; i++) {
    nanosleep(&ts, NULL);
    if (write(pipe_fds[1], "x", 1) != 1) {
      perror("write");
      exit(1);
    }
  }
  return NULL;
}

int main(int argc, char **argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: %s ITERATIONS SPINS\n", argv[0]);
    return 2;
  }
  iterations = atoi(argv[1]);
  int spins = atoi(argv[2]);
  if (pipe(pipe_fds) != 0) {
    perror("pipe");
    return 1;
  }
  printf("ready %d\n", getpid());
  fflush(stdout);
  getchar();

  pthread_t feeder;
  if (pthread_create(&feeder, NULL, feed_pipe, NULL) != 0) {
    perror("pthread_create");
    return 1;
  }
  int done = 0;
  for (int i = 0; i < iterations; i++)
    done = request(done);
  pthread_join(feeder, NULL);

  long long spin_wall_ns = 0;
  long long cpu_start = clock_ns(CLOCK_THREAD_CPUTIME_ID);
  for (int i = 0; i < spins; i++)
    spin_wall_ns += spin_clock(100);
  long long spin_cpu_ns = clock_ns(CLOCK_THREAD_CPUTIME_ID) - cpu_start;

  printf("requests %d\n", done);
  printf("sleep_step_ns %lld\n", sleep_step_ns);
  printf("read_step_ns %lld\n", read_step_ns);
  printf("spin_clock_wall_ns %lld\n", spin_wall_ns);
  printf("spin_clock_cpu_ns %lld\n", spin_cpu_ns);
  printf("done\n");
  fflush(stdout);
  return 0;
}
