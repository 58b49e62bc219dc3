// A function whose CFI puts the CFA in r12, a rule the profiler's walker does not follow
// (compilers emit such rules for stack realignment; the walker knows rsp- and rbp-based
// CFAs, the PLT and signal frames). `odd_sleep` blocks in a raw nanosleep there, so every
// off-CPU walk of this process stops on that rule: the --ebpf-log test expects exactly one
// log line for it, however many walks stop.
//
// Usage: unwind_odd_cfa SLEEPS   (each 10 ms)
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

void odd_sleep(const struct timespec *ts);

__asm__(".text\n"
        ".globl odd_sleep\n"
        ".type odd_sleep, @function\n"
        "odd_sleep:\n"
        ".cfi_startproc\n"
        "  push %r12\n"
        ".cfi_adjust_cfa_offset 8\n"
        ".cfi_offset %r12, -16\n"
        "  lea 16(%rsp), %r12\n"
        ".cfi_def_cfa %r12, 0\n"
        "  mov $35, %eax\n" // SYS_nanosleep(rdi = ts, rsi = NULL)
        "  xor %esi, %esi\n"
        "  syscall\n"
        "  pop %r12\n"
        ".cfi_def_cfa %rsp, 8\n"
        "  ret\n"
        ".cfi_endproc\n"
        ".size odd_sleep, .-odd_sleep\n");

int main(int argc, char **argv) {
  int sleeps = argc > 1 ? atoi(argv[1]) : 300;
  struct timespec ts = {0, 10 * 1000 * 1000};
  printf("ready %d\n", (int)getpid());
  fflush(stdout);
  for (int i = 0; i < sleeps; i++) odd_sleep(&ts);
  return 0;
}
