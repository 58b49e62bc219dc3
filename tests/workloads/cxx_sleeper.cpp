// C++ workload: checks that C++ frames come out demangled (namespace, template, signature).
// Sleeps with a raw syscall inside the method so the method itself is the innermost user
// frame. Prints "ready PID", waits for a line on stdin, then prints its own blocked time.
#include <cstdio>
#include <ctime>
#include <unistd.h>

namespace sleepers {
template <typename T> struct Waiter {
  __attribute__((noinline)) long block_in_nanosleep(long ms) {
    struct timespec ts = {0, ms * 1000000};
    long ret;
    asm volatile("syscall" : "=a"(ret) : "a"(35L), "D"(&ts), "S"(0L) : "rcx", "r11", "memory");
    return ret;
  }
};
} // namespace sleepers

static long long now_ns() {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

__attribute__((noinline)) long long run_cxx_waits(int n) {
  sleepers::Waiter<int> waiter;
  long long blocked = 0;
  for (int i = 0; i < n; i++) {
    long long start = now_ns();
    waiter.block_in_nanosleep(20);
    blocked += now_ns() - start;
  }
  return blocked;
}

int main() {
  printf("ready %d\n", getpid());
  fflush(stdout);
  getchar();
  long long blocked = run_cxx_waits(10);
  printf("blocked_ns %lld\n", blocked);
  return 0;
}
