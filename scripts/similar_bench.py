"""Queries per second of `artfuse similar`'s exact search (artfuse.review.neighbours) against the number of artworks.

    python scripts/similar_bench.py [--sizes 1000 10000 100000 1000000] [--dim 192] [--queries 50]

Random unit embeddings of the default model's width (192); each query is one artwork against all (the review page
asks once per image shown). Prints one JSON line per size: build seconds, wall and CPU ms per query, queries/s,
memory.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from artfuse.review.neighbours import NearestNeighbours


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=192)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("-k", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    for n in args.sizes:
        embeddings = rng.standard_normal((n, args.dim), dtype=np.float32).astype(np.float16)  # as the Parquet holds
        started = time.perf_counter()
        index = NearestNeighbours(embeddings)
        built = time.perf_counter() - started
        rows = rng.integers(0, n, args.queries)
        index.query(int(rows[0]), args.k)  # warm
        started, cpu_started = time.perf_counter(), time.process_time()
        for row in rows:
            index.query(int(row), args.k)
        per_query = (time.perf_counter() - started) / args.queries
        cpu_per_query = (time.process_time() - cpu_started) / args.queries
        print(
            json.dumps(
                {
                    "n": n,
                    "dim": args.dim,
                    "build_s": round(built, 3),
                    "ms_per_query": round(per_query * 1000, 2),
                    "cpu_ms_per_query": round(cpu_per_query * 1000, 2),  # all threads' CPU: what a quiet machine pays
                    "queries_per_s": round(1 / per_query, 1),
                    "index_mb": round(index.vectors.nbytes / 2**20, 1),
                }
            ),
            flush=True,
        )
        del embeddings, index


if __name__ == "__main__":
    main()
