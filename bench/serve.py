"""Benchmark: ``graft serve`` on loopback under a bounded load of real images.

Serves the pipeline's exported model (models/model.onnx) if there is one, else the small
fixture model, with the real ``graft serve`` command, with 1 and with 2 worker processes
(``--workers``; onnxruntime threads per worker = cores // workers); 8 and then 32 client
threads send single-image ``POST /predict`` requests (real digits from data/, else the fixture
digits), each waiting for its answer before the next. The baseline, in this process on the same
images: the same work without HTTP (decode, preprocess, onnxruntime, top-k), one image after
another. Writes requests/s, p50/p99 latency, the error count (must be 0) and the ratio to the
baseline per configuration to bench/results/serve.json.

    python bench/serve.py [--requests 1000] [--clients 8 32] [--workers 1 2]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from graft.serving.model import decode, load_model

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results" / "serve.json"
PIPELINE_MODEL = ROOT / "models" / "model.onnx"
FIXTURE_MODEL = ROOT / "tests" / "fixtures" / "serving" / "digits.onnx"
GRAFT = str(Path(sys.executable).parent / "graft")


def sample_images(limit: int = 64) -> list[Path]:
    for folder in (ROOT / "data", ROOT / "tests" / "fixtures" / "serving" / "images"):
        found = sorted(folder.rglob("*.png"))
        if found:
            return found[:: max(1, len(found) // limit)][:limit]
    raise SystemExit("no sample images: run `graft sample-data` first")


def baseline_images_per_s(model_path: Path, images: list[bytes], count: int) -> float:
    """The server's work without HTTP, one image at a time, in this process."""
    model = load_model(model_path)
    for data in images[:8]:  # warm-up, like the server's
        model.classify(model.preprocess(decode(data))[None], 5)
    started = time.perf_counter()
    for data in itertools.islice(itertools.cycle(images), count):
        model.classify(model.preprocess(decode(data))[None], 5)
    return count / (time.perf_counter() - started)


def start_server(model: Path, port: int, workers: int, log: Path) -> subprocess.Popen:
    command = [GRAFT, "serve", str(model), "--port", str(port), "--reload-interval", "0"]
    command += ["--workers", str(workers)]
    with log.open("wb") as sink:
        server = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"graft serve exited:\n{log.read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            time.sleep(0.2)
    server.kill()
    raise SystemExit("graft serve did not become ready in 120 s")


def run_load(url: str, images: list[bytes], requests: int, clients: int) -> dict:
    tickets = iter(range(requests))
    lock = threading.Lock()
    latencies: list[float] = []
    errors: list[str] = []

    def client() -> None:
        with httpx.Client(base_url=url, timeout=60) as http:
            while True:
                with lock:
                    ticket = next(tickets, None)
                if ticket is None:
                    return
                started = time.perf_counter()
                try:
                    response = http.post(
                        "/predict",
                        content=images[ticket % len(images)],
                        headers={"content-type": "image/png"},
                    )
                    ok = response.status_code == 200 and response.json()["predictions"]
                    problem = None if ok else f"{response.status_code}: {response.text[:200]}"
                except Exception as exc:  # counted, never hidden
                    problem = repr(exc)
                elapsed = time.perf_counter() - started
                with lock:
                    latencies.append(elapsed)
                    if problem:
                        errors.append(problem)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {
        "requests": len(latencies),
        "seconds": round(seconds, 2),
        "requests_per_s": round(len(latencies) / seconds, 1),
        "latency_p50_ms": round(float(np.percentile(ms, 50)), 1),
        "latency_p99_ms": round(float(np.percentile(ms, 99)), 1),
        "latency_max_ms": round(float(ms.max()), 1),
        "errors": len(errors),
        "first_errors": errors[:5],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=1000, help="per configuration")
    parser.add_argument("--clients", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    model = PIPELINE_MODEL if PIPELINE_MODEL.is_file() else FIXTURE_MODEL
    paths = sample_images()
    images = [path.read_bytes() for path in paths]
    served = load_model(model)
    baseline = baseline_images_per_s(model, images, 200)
    runs = []
    for workers in args.workers:
        port = 18000 + (os.getpid() + workers) % 1000
        with tempfile.TemporaryDirectory() as tmp:
            server = start_server(model, port, workers, Path(tmp) / "server.log")
            try:
                url = f"http://127.0.0.1:{port}"
                for clients in args.clients:
                    run_load(url, images, 100, clients)  # warm-up, not counted
                    load = run_load(url, images, args.requests, clients)
                    ratio = round(load["requests_per_s"] / baseline, 2)
                    runs.append(
                        {
                            "workers": workers,
                            "clients": clients,
                            **load,
                            "ratio_server_vs_in_process": ratio,
                        }
                    )
                    print(json.dumps(runs[-1]), flush=True)
            finally:
                server.terminate()
                server.wait(timeout=60)
    figures = {
        "what": "graft serve on loopback, single-image POST /predict, real digit PNGs",
        "caveat": "measured on a shared 2-core machine while other engineers' jobs ran: "
        "absolute figures are inflated by their load; compare the runs with each other",
        "model": str(model.relative_to(ROOT)),
        "model_sha256": served.sha256[:12],
        "input_size": list(served.preprocessing.input_size),
        "images": len(images),
        "server_threads": "cores // workers per worker (graft serve --threads 0)",
        "baseline_in_process_images_per_s": round(baseline, 1),
        "runs": runs,
        "cores": os.cpu_count(),
        "machine": platform.machine(),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
    failed = sum(run["errors"] for run in runs)
    if failed:
        raise SystemExit(f"{failed} requests failed: {[r['first_errors'] for r in runs]}")


if __name__ == "__main__":
    main()
