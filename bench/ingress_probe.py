#!/usr/bin/env python3
"""The two probes of the "hostile input" review, from outside, against a running ingress.

1. Slow headers: N connections send half a request head and then nothing; reports how long
   ingress keeps them open (the review saw all 300 still open after 60 s).
2. CPU bombs: four attackers send 1 MiB bodies with `t=<now>,` and 40,000 empty `v1=` items
   while genuine, correctly signed webhooks are sent one after the other; reports the genuine
   p50/p99 and the slowest bomb answer (the review saw genuine webhooks time out and bombs
   answered after up to 58 s).

Usage: bench/ingress_probe.py URL SECRET [genuine=300] [stalled=300]
  URL: ingress base, e.g. http://127.0.0.1:8080; SECRET: its STRIPE_WEBHOOK_SECRET.
Standard library only.
"""
import hashlib, hmac, http.client, json, socket, sys, threading, time
from urllib.parse import urlparse

url, secret = sys.argv[1], sys.argv[2]
genuine_n = int(sys.argv[3]) if len(sys.argv) > 3 else 300
stalled_n = int(sys.argv[4]) if len(sys.argv) > 4 else 300
host, port = urlparse(url).hostname, urlparse(url).port or 80


def stall(results):
    s = socket.create_connection((host, port))
    s.sendall(b"POST /webhooks/stripe HTTP/1.1\r\nHost: ingress\r\nStripe-Signa")
    start = time.monotonic()
    s.settimeout(120)
    try:
        while s.recv(1024):
            pass
    except OSError:
        pass
    results.append(time.monotonic() - start)
    s.close()


def post(conn, body, signature):
    conn.request("POST", "/webhooks/stripe", body=body,
                 headers={"Stripe-Signature": signature, "Content-Type": "application/json"})
    response = conn.getresponse()
    return response.status, response.read()


stalls = []
threads = [threading.Thread(target=stall, args=(stalls,)) for _ in range(stalled_n)]
for t in threads:
    t.start()
for t in threads:
    t.join()
stalls.sort()
print(f"RESULT stalled={len(stalls)} first_closed={stalls[0]:.1f}s last_closed={stalls[-1]:.1f}s")

stop = threading.Event()
bombs = []


def bomber():
    body = b"x" * (1 << 20)
    conn = http.client.HTTPConnection(host, port, timeout=120)
    while not stop.is_set():
        header = f"t={int(time.time())}," + "v1=," * 40000
        start = time.monotonic()
        try:
            status, _ = post(conn, body, header)
        except (OSError, http.client.HTTPException) as e:
            status = repr(e)
            conn = http.client.HTTPConnection(host, port, timeout=120)
        bombs.append((time.monotonic() - start, status))


attackers = [threading.Thread(target=bomber) for _ in range(4)]
for t in attackers:
    t.start()
time.sleep(0.5)
conn = http.client.HTTPConnection(host, port, timeout=120)
latencies = []
for n in range(genuine_n):
    now = int(time.time())
    body = json.dumps({"id": f"evt_probe_{now}_{n}", "object": "event",
                       "type": "checkout.session.completed", "created": now}).encode()
    signature = hmac.new(secret.encode(), f"{now}.".encode() + body, hashlib.sha256).hexdigest()
    start = time.monotonic()
    status, _ = post(conn, body, f"t={now},v1={signature}")
    latencies.append(time.monotonic() - start)
    assert status == 200, status
stop.set()
for t in attackers:
    t.join()
latencies.sort()
p = lambda q: latencies[min(len(latencies) - 1, int(len(latencies) * q))]
worst = max(b[0] for b in bombs)
statuses = sorted({str(b[1]) for b in bombs})
print(f"RESULT genuine={len(latencies)} p50={p(0.5)*1000:.1f}ms p99={p(0.99)*1000:.1f}ms "
      f"max={latencies[-1]*1000:.1f}ms bombs={len(bombs)} bomb_statuses={statuses} "
      f"slowest_bomb={worst*1000:.1f}ms")
