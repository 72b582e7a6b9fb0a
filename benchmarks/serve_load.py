"""Load on ``python -m jaxmm.serve`` over loopback, against offline ``Classifier.predict``.

    python benchmarks/serve_load.py --model BUNDLE --photos FOLDER [--requests 256]
        [--concurrency 1,8,32,64] [--max_batch 32] [--max_wait_ms 10] [--out result.json]

In one run, on the same machine and bundle:

- offline: ``Classifier.load(BUNDLE, batch_size=max_batch).predict(paths, texts)`` over the
  photos (file-name texts), photos/s after a warm-up pass, in a fresh process pinned to the
  server's CPUs;
- the server, started with ``--max_batch``/``--max_wait_ms`` and pinned to its CPUs (half the
  machine, with ``taskset``), answering ``--requests`` requests (one photo each, multipart, as a
  phone sends them) per concurrency level, from plain asyncio HTTP/1.1 clients (one kept-alive
  connection each) pinned to the other CPUs:
  requests/s, p50/p95/p99 latency, errors, the mean device batch (from /metrics), the CPU
  seconds of server and client, and the server's resident memory before (after a warm-up
  round at the highest concurrency, so that every batch shape has run) and after all levels.
  "× offline" compares requests/s with the offline photos/s; "× offline (CPU)" compares the
  CPU time per photo (offline) with the server's CPU time per request, which other processes
  sharing the machine do not distort.

The load is bounded: a fixed number of requests per level, a timeout per request.
"""

import argparse
import asyncio
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="bundle folder (jaxmm.export)")
    p.add_argument("--photos", required=True, help="folder of photos (searched recursively)")
    p.add_argument("--requests", type=int, default=256, help="requests per concurrency level")
    p.add_argument("--concurrency", default="1,8,32,64")
    p.add_argument("--max_batch", type=int, default=32)
    p.add_argument("--max_wait_ms", type=float, default=10.0)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    p.add_argument("--out", default="", help="also write the result JSON here")
    # Internal: the offline measurement in a fresh process (BUNDLE FOLDER MAX_BATCH).
    p.add_argument("--child", nargs=3, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def cpu_split() -> tuple[list[int], list[int]]:
    """(server CPUs, client CPUs): the first and second half of the usable CPUs."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return cpus, cpus
    half = len(cpus) // 2
    return cpus[:half], cpus[half:]


def photos_and_texts(folder: str, limit: int = 256):
    from jaxmm.trained import classify

    files, problems, _ = classify.find_images([folder])
    if not files:
        raise SystemExit("; ".join(problems) or f"{folder}: no photos")
    return files[:limit]


def offline(bundle: str, folder: str, max_batch: int) -> dict:
    """Photos/s of Classifier.predict over the folder (second pass; the first compiles)."""
    from jaxmm.trained.classifier import Classifier

    files = photos_and_texts(folder)
    clf = Classifier.load(bundle, batch_size=max_batch)
    texts = [clf.spec.preprocessing.text_of(f) for f in files]
    clf.predict(files, texts)
    start, cpu = time.perf_counter(), time.process_time()
    clf.predict(files, texts)
    seconds = time.perf_counter() - start
    return {"photos": len(files), "photos_per_s": len(files) / seconds,
            "cpu_s": time.process_time() - cpu}


def _pin(cpus) -> list[str]:
    return ["taskset", "-c", ",".join(map(str, cpus))] if len(cpus) else []


def _server_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) * 1024


def _server_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=60) as r:
        return r.read().decode()


def _batches(metrics: str) -> tuple[float, float]:
    total = float(re.search(r"^jaxmm_batch_size_sum (\S+)$", metrics, re.M).group(1))
    count = float(re.search(r"^jaxmm_batch_size_count (\S+)$", metrics, re.M).group(1))
    return total, count


def _request(path: str, text: str) -> bytes:
    """The whole HTTP request of one photo (multipart, as a phone's browser sends it)."""
    boundary = "jaxmmbenchmark"
    with open(path, "rb") as f:
        data = f.read()
    name = os.path.basename(path).replace('"', "")
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"'
            f"\r\n\r\n").encode() + data + (
        f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="text"\r\n\r\n{text}\r\n'
        f"--{boundary}--\r\n").encode()
    head = (f"POST /v1/predict HTTP/1.1\r\nHost: bench\r\nContent-Type: multipart/form-data; "
            f"boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    return head + body


async def _exchange(reader, writer, request: bytes) -> int:
    """Sends one request on a kept-alive connection; the status of its answer."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
    body = await reader.readexactly(length)
    status = int(head.split(b" ", 2)[1])
    if status != 200:
        raise RuntimeError(f"{status}: {body[:100]!r}")
    return status


async def level(url: str, requests_: list, concurrency: int, requests: int,
                timeout: float) -> dict:
    """``requests`` POSTs from ``concurrency`` clients, each on its own kept-alive connection
    (a plain asyncio client: a heavier one would be the bottleneck on a small machine)."""
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    latencies, errors, next_index = [], [], iter(range(requests))

    async def worker():
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            for i in next_index:
                start = time.perf_counter()
                try:
                    await asyncio.wait_for(_exchange(reader, writer,
                                                     requests_[i % len(requests_)]), timeout)
                except (RuntimeError, OSError, asyncio.IncompleteReadError,
                        TimeoutError) as e:
                    errors.append(f"{type(e).__name__}: {e}")
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, int(port))
                latencies.append(time.perf_counter() - start)
        finally:
            writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    seconds = time.perf_counter() - start
    ms = sorted(1000 * x for x in latencies)
    pick = lambda q: ms[min(len(ms) - 1, int(q * len(ms)))]  # noqa: E731
    return {"concurrency": concurrency, "requests": requests, "seconds": seconds,
            "requests_per_s": requests / seconds, "p50_ms": pick(0.50), "p95_ms": pick(0.95),
            "p99_ms": pick(0.99), "errors": len(errors), "first_errors": errors[:3]}


def start_server(args, cpus) -> tuple[subprocess.Popen, str]:
    cmd = [*_pin(cpus), sys.executable, "-m", "jaxmm.serve", "--model", args.model,
           "--port", "0", "--max_batch", str(args.max_batch), "--max_wait_ms",
           str(args.max_wait_ms), "--max_queue", "1024"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    for line in proc.stdout:
        if line.startswith("ready: "):
            return proc, line[len("ready: "):].strip().rstrip("/")
    raise SystemExit(f"the server did not start (exit {proc.wait()})")


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(offline(args.child[0], args.child[1], int(args.child[2]))))
        return {}
    server_cpus, client_cpus = cpu_split()
    out = subprocess.run([*_pin(server_cpus), sys.executable, __file__, "--model", args.model,
                          "--photos", args.photos, "--child", args.model, args.photos,
                          str(args.max_batch)], capture_output=True, text=True, check=True)
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
              "server_cpus": server_cpus, "client_cpus": client_cpus,
              "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms,
              "offline": json.loads(out.stdout.strip().splitlines()[-1]), "levels": []}
    files = photos_and_texts(args.photos)
    from jaxmm.trained import bundle

    spec = bundle.spec_of(bundle.read_record(args.model))
    bodies = [_request(f, spec.preprocessing.text_of(f)) for f in files]
    proc, url = start_server(args, server_cpus)
    try:
        if len(client_cpus):
            os.sched_setaffinity(0, client_cpus)
        # Warm-up round at the highest concurrency, so that every batch shape has run once
        # and "before" is the resident memory of a server in use.
        top = max(int(x) for x in args.concurrency.split(","))
        asyncio.run(level(url, bodies, top, 2 * top, args.timeout))
        result["server_rss_before"] = _server_rss(proc.pid)
        for c in (int(x) for x in args.concurrency.split(",")):
            before = _batches(_get(url + "/metrics"))
            cpu_server, cpu_client = _server_cpu(proc.pid), time.process_time()
            row = asyncio.run(level(url, bodies, c, args.requests, args.timeout))
            after = _batches(_get(url + "/metrics"))
            row["mean_batch"] = (after[0] - before[0]) / max(1.0, after[1] - before[1])
            row["server_cpu_s"] = _server_cpu(proc.pid) - cpu_server
            row["client_cpu_s"] = time.process_time() - cpu_client
            row["vs_offline"] = row["requests_per_s"] / result["offline"]["photos_per_s"]
            # Robust to other processes on the machine: CPU seconds per photo, offline / served.
            offline_cpu = result["offline"]["cpu_s"] / result["offline"]["photos"]
            row["vs_offline_cpu"] = offline_cpu / (row["server_cpu_s"] / args.requests)
            result["levels"].append(row)
            print(json.dumps(row), flush=True)
        result["server_rss_after"] = _server_rss(proc.pid)
    finally:
        proc.terminate()
        result["server_exit"] = proc.wait(60)
    result["rss_growth"] = result["server_rss_after"] / result["server_rss_before"] - 1
    result["client_peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(table(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


def table(r: dict) -> str:
    """The result as a Markdown table."""
    per_photo = 1000 * r["offline"]["cpu_s"] / r["offline"]["photos"]
    lines = [f"offline Classifier.predict: {r['offline']['photos_per_s']:.1f} photos/s, "
             f"{per_photo:.2f} CPU ms a photo (batch {r['max_batch']}, CPUs "
             f"{r['server_cpus']}); server RSS "
             f"{r['server_rss_before'] / 2**20:.0f} -> {r['server_rss_after'] / 2**20:.0f} MiB "
             f"({100 * r['rss_growth']:+.1f} %)", "",
             "| concurrency | requests | req/s | × offline | p50 ms | p95 ms | p99 ms | errors "
             "| mean batch | server CPU s | client CPU s | × offline (CPU) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in r["levels"]:
        lines.append(f"| {x['concurrency']} | {x['requests']} | {x['requests_per_s']:.1f} | "
                     f"{x['vs_offline']:.2f} | {x['p50_ms']:.0f} | {x['p95_ms']:.0f} | "
                     f"{x['p99_ms']:.0f} | {x['errors']} | {x['mean_batch']:.1f} | "
                     f"{x['server_cpu_s']:.2f} | {x['client_cpu_s']:.2f} | "
                     f"{x['vs_offline_cpu']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
