#!/usr/bin/env python3
"""Writes the wrk script of the ingress benchmarks: POST one valid 2 KB event signed now with
SECRET, and print one `WRK rps=… p50_ms=… p99_ms=… requests=… errors=…` line at the end.

Usage: bench/ingress_wrk.py SECRET OUT.lua
The tolerance must be widened on the server (STRIPE_WEBHOOK_TOLERANCE_SECONDS) so the
signature stays valid for the whole run; ingress does not dedupe, so every request is a publish.
"""
import hashlib
import hmac
import json
import sys
import time

secret, out = sys.argv[1], sys.argv[2]
t = int(time.time())
event = {"id": "evt_bench_0001", "object": "event", "type": "checkout.session.completed",
         "created": t, "data": {"object": {"id": "cs_bench", "client_reference_id": "u_bench",
         "payment_status": "paid", "metadata": {"user_id": "u_bench", "product_key": "pro"}}}}
body = json.dumps(event, separators=(",", ":"))
event["padding"] = "x" * (2048 - len(body) - len(',"padding":""'))
body = json.dumps(event, separators=(",", ":"))
assert len(body) == 2048, len(body)
sig = hmac.new(secret.encode(), f"{t}.{body}".encode(), hashlib.sha256).hexdigest()
with open(out, "w") as f:
    f.write('wrk.method = "POST"\n')
    f.write('wrk.headers["Content-Type"] = "application/json"\n')
    f.write(f'wrk.headers["Stripe-Signature"] = "t={t},v1={sig}"\n')
    f.write("wrk.body = " + json.dumps(body) + "\n")
    f.write('''
done = function(summary, latency, requests)
  io.write(string.format("WRK rps=%.0f p50_ms=%.2f p99_ms=%.2f requests=%d errors=%d\\n",
    summary.requests / (summary.duration / 1e6), latency:percentile(50) / 1000,
    latency:percentile(99) / 1000, summary.requests,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.status + summary.errors.timeout))
end
''')
