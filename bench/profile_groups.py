#!/usr/bin/env python3
"""Groups a profile of ingress by what the code does (HTTP, HMAC, envelope, publish, …).

Usage:
  bench/profile_groups.py perf PERF.DATA           share of the process's CPU samples
  bench/profile_groups.py callgrind FILE REQUESTS  instructions per request (kernel not counted)
Symbols are matched by crate or function name, in order; the first group that matches wins.
"""
import re
import subprocess
import sys

GROUPS = [
    ("kernel: scheduling, wake-ups, futex",
     r"\[k\] .*(finish_task_switch|_raw_spin|schedule|futex|try_to_wake|ttwu|enqueue|dequeue|"
     r"update_|pick_next|psi_|switch|irqentry|native_|__wake|select_task|set_next|hrtimer|tick|"
     r"idle|rcu|syscall_exit|entry_SYSCALL|do_syscall|exit_to_user)"),
    ("kernel: TCP, sockets, epoll, writes", r"\[k\] "),
    ("HMAC-SHA256 + signature header",
     r"sha2::|hmac::|digest::|hex::|signature::(Verifier|ParsedHeader|mac_for)|subtle::"),
    ("envelope JSON parse", r"serde_json::|serde_core::|serde::|VerifiedWebhook|StripeEventId"),
    ("lapin publish + confirm",
     r"lapin|amq_protocol|cookie_factory|flume::|event_listener|async_rs|pinky|nom::|"
     r"BasicProperties|FieldTable|chrono::|amqp::Publisher|routes::properties"),
    ("metrics", r"metrics|quanta|sketches|crossbeam_epoch"),
    ("tracing / logging", r"tracing|sharded_slab|Instrumented|nu_ansi_term"),
    ("HTTP (hyper, axum, tower, http)",
     r"hyper|httparse|http::|http_body|axum|tower|matchit|httpdate|shared::server|"
     r"routes::webhook|Handler<|bytes::"),
    ("tokio runtime, timers",
     r"tokio::|mio::|parking_lot|clock_gettime|Timespec|Instant|SystemTime|thread::functions::park|"
     r"atomic_waker|epoll|syscall|cancellation.c"),
    ("malloc, free, memcpy",
     r"malloc|free|_int_|unlink_chunk|tcache|memmove|memcpy|memset|__rust_alloc|__rust_dealloc|"
     r"__rdl_|realloc|RawVec|alloc::|\bmi_|_mi_|mimalloc"),
]


def group(symbol):
    for name, pattern in GROUPS:
        if re.search(pattern, symbol):
            return name
    return "other"


def perf(data):
    out = subprocess.run(["perf", "report", "-i", data, "--sort", "comm,dso,sym", "--stdio"],
                         capture_output=True, text=True, check=True).stdout
    totals, total = {}, 0.0
    for line in out.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+\S+\s+\S+\s+(.*)", line)
        if m:
            pct = float(m.group(1))
            total += pct
            totals[group(m.group(2))] = totals.get(group(m.group(2)), 0) + pct
    for name, pct in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"PROFILE {name:40} {100 * pct / total:5.1f} %")


def callgrind(path, requests):
    out = subprocess.run(["callgrind_annotate", "--inclusive=no", "--auto=no", "--threshold=100",
                          path], capture_output=True, text=True, check=True).stdout
    totals, total, program = {}, 0, None
    for line in out.splitlines():
        m = re.match(r"\s*([\d,]+)\s+\([^)]*\)\s+(.*)", line)
        if not m:
            continue
        n = int(m.group(1).replace(",", ""))
        if "PROGRAM TOTALS" in line:
            program = n
            continue
        # Frames that were on the stack when the counters were zeroed show their whole inclusive
        # cost as their own; no real function takes 90 % of the program.
        if program is not None and n > 0.9 * program:
            continue
        total += n
        totals[group(m.group(2))] = totals.get(group(m.group(2)), 0) + n
    for name, n in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"PROFILE {name:40} {n / requests:10,.0f} instructions/request")
    print(f"PROFILE {'total':40} {total / requests:10,.0f} instructions/request")


if __name__ == "__main__":
    if sys.argv[1] == "perf":
        perf(sys.argv[2])
    else:
        callgrind(sys.argv[2], int(sys.argv[3]))
