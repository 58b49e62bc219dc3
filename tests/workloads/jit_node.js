// Blocks in Atomics.wait (a futex under V8's condition variable) from nested JavaScript
// functions and a method, for `tests/jit.rs`.
//
// Prints `ready PID`, waits for a line on stdin, then runs ROUNDS calls
// outer -> Service.handle -> middle -> inner, each waiting WAIT_MS in inner, timed by the
// workload's own clock (performance.now around each wait). Ends with `stack JSON` (V8's own
// stack trace, taken in inner) and `inner_ns N`, then waits for one more line.
"use strict";
const rounds = Number(process.argv[2]);
const waitMs = Number(process.argv[3]);
const cell = new Int32Array(new SharedArrayBuffer(4));
let waited = 0;
let trace = null;

function inner() {
  const began = performance.now();
  Atomics.wait(cell, 0, 0, waitMs);
  waited += performance.now() - began;
  if (trace === null) trace = new Error().stack;
}

function middle() {
  inner();
}

class Service {
  handle() {
    middle();
  }
}

function outer() {
  const service = new Service();
  for (let i = 0; i < rounds; i++) service.handle();
}

console.log("ready", process.pid);
let lines = 0;
process.stdin.on("data", () => {
  lines += 1;
  if (lines === 1) {
    outer();
    console.log("stack", JSON.stringify(trace));
    console.log("inner_ns", Math.round(waited * 1e6));
  } else {
    process.exit(0);
  }
});
