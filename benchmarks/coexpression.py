"""Correlation-graph build time and peak memory: stinfer's block kernel vs a dense numpy reference.

For every (genes, cells) case a synthetic sparse count matrix (``--density``, default 5 %) is
generated once and cached as ``.npz``; then each method runs in a **fresh subprocess** that
loads the matrix and builds the top-K graph, while a thread samples the process RSS every
20 ms. Reported per case and method: build seconds, peak RSS of the process, and the peak
above the RSS right after loading the input (what the build itself allocated).

- ``stinfer``: :func:`stinfer.coexpression.graph.build_correlation_graph` (log1p-CP10k
  Pearson, exact top-K by gene blocks; memory ``O(genes * K + cells * block)``).
- ``dense``: the textbook reference: densify the normalised matrix, standardise it,
  ``C = Z^T Z / n`` (a dense ``genes x genes`` matrix) and ``np.argpartition`` per row. Run
  only when its estimated memory (``4 * (cells * genes + 2 * genes^2)`` bytes) is below
  ``--dense-max-gb``. Where both run, the fraction of genes whose top-K partner sets agree is
  reported (1.0 expected; ties at the K-th place can differ).

``--kernel-check`` also times one block pair both ways, dense GEMM on densified blocks vs a
torch sparse CSR x dense product, the measurement behind the block kernel's design.

    python benchmarks/coexpression.py --genes 2000 5000 10000 20000 --cells 10000 50000 \\
        --out coexpression_benchmark.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp


# --------------------------------------------------------------------------- memory sampling
class PeakRSS:
    """Sample this process's resident set size in a thread; ``peak`` in bytes."""

    def __init__(self, interval_s: float = 0.02) -> None:
        import psutil

        self._process = psutil.Process()
        self._interval = interval_s
        self._stop = threading.Event()
        self.start_rss = self._process.memory_info().rss
        self.peak = self.start_rss
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(self._interval)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


# --------------------------------------------------------------------------- workers
def dense_reference_top_k(counts: sp.csr_matrix, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-K partners and their correlations from a dense genes x genes Pearson matrix
    (log1p-CP10k)."""
    dense = counts.toarray()
    totals = dense.sum(axis=1, keepdims=True)
    np.divide(dense * 1e4, totals, out=dense, where=totals > 0)
    np.log1p(dense, out=dense)
    dense -= dense.mean(axis=0)
    std = dense.std(axis=0)
    dense /= np.where(std > 0, std, np.inf)
    correlation = dense.T @ dense
    correlation /= dense.shape[0]
    del dense
    np.fill_diagonal(correlation, -np.inf)
    partners = np.argpartition(-correlation, top_k, axis=1)[:, :top_k]
    return partners, np.take_along_axis(correlation, partners, axis=1)


def run_worker(args: argparse.Namespace) -> None:
    """Subprocess body: load the cached matrix, build, print one JSON line."""
    if args.worker == "stinfer":  # imports (torch, anndata) outside the measured region
        import anndata as ad

        from stinfer.coexpression.graph import CorrelationGraphConfig, build_correlation_graph
    loaded = sp.load_npz(args.matrix).tocsr()
    partners_path = Path(args.partners)
    with PeakRSS() as memory:
        start = time.perf_counter()
        if args.worker == "stinfer":
            adata = ad.AnnData(loaded)
            adata.var_names = [f"g{i}" for i in range(loaded.shape[1])]
            config = CorrelationGraphConfig(
                top_k=args.top_k, min_cells=0, block_size=args.block_size
            )
            graph = build_correlation_graph([adata], config)
            kept = graph.gene_names.str[1:].astype(int).to_numpy()
            partners = np.full((loaded.shape[1], args.top_k), -1, dtype=np.int64)
            partners[kept] = kept[graph.partner.reshape(-1, graph.top_k)]
            values = np.full((loaded.shape[1], args.top_k), np.nan, dtype=np.float32)
            values[kept] = graph.correlation.reshape(-1, graph.top_k)
        else:
            partners, values = dense_reference_top_k(loaded, args.top_k)
        seconds = time.perf_counter() - start
    np.save(partners_path, partners)  # (genes, K) partner indices, for the agreement check
    print(
        json.dumps(
            {
                "seconds": seconds,
                "peak_rss_gb": memory.peak / 1e9,
                "input_rss_gb": memory.start_rss / 1e9,
                "build_extra_gb": (memory.peak - memory.start_rss) / 1e9,
            }
        )
    )


def run_kernel_check(args: argparse.Namespace) -> None:
    """Time one block pair: dense GEMM of densified blocks vs torch sparse CSR x dense."""
    import torch

    matrix = sp.load_npz(args.matrix).tocsc()
    block = min(args.block_size, matrix.shape[1] // 2)
    first = matrix[:, :block]
    second = matrix[:, block : 2 * block]
    start = time.perf_counter()
    dense_first, dense_second = (
        torch.from_numpy(first.toarray()),
        torch.from_numpy(second.toarray()),
    )
    densify = time.perf_counter() - start
    start = time.perf_counter()
    _ = dense_first.T @ dense_second
    gemm = time.perf_counter() - start
    transposed = first.T.tocsr()
    sparse = torch.sparse_csr_tensor(
        torch.from_numpy(transposed.indptr.astype(np.int64)),
        torch.from_numpy(transposed.indices.astype(np.int64)),
        torch.from_numpy(transposed.data),
        size=transposed.shape,
    )
    start = time.perf_counter()
    _ = sparse @ dense_second
    sparse_seconds = time.perf_counter() - start
    print(
        json.dumps(
            {
                "block": block,
                "densify_s": densify,
                "dense_gemm_s": gemm,
                "sparse_x_dense_s": sparse_seconds,
            }
        )
    )


# --------------------------------------------------------------------------- driver
def subprocess_json(command: list[str], threads: int) -> dict:
    environment = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    completed = subprocess.run(
        command, capture_output=True, text=True, env=environment, check=False
    )
    if completed.returncode != 0:
        return {
            "error": completed.stderr.strip().splitlines()[-1] if completed.stderr else "failed"
        }
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--genes", type=int, nargs="+", default=[2000, 5000, 10000, 20000])
    parser.add_argument("--cells", type=int, nargs="+", default=[10000, 50000])
    parser.add_argument("--density", type=float, default=0.05)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--block-size", type=int, default=1024)
    parser.add_argument("--dense-max-gb", type=float, default=6.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kernel-check", action="store_true")
    parser.add_argument("--cache-dir", type=Path, help="where the synthetic matrices are kept")
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    parser.add_argument("--worker", choices=["stinfer", "dense", "kernel"], help=argparse.SUPPRESS)
    parser.add_argument("--matrix", help=argparse.SUPPRESS)
    parser.add_argument("--partners", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "kernel":
        run_kernel_check(args)
        return
    if args.worker:
        run_worker(args)
        return

    from stinfer.coexpression.synthetic import sparse_count_corpus

    cache = args.cache_dir or Path(tempfile.mkdtemp(prefix="stinfer_coexpression_"))
    cache.mkdir(parents=True, exist_ok=True)
    rows = []
    for n_cells in args.cells:
        for n_genes in args.genes:
            matrix_path = cache / f"counts_{n_cells}x{n_genes}_{args.density:g}.npz"
            if not matrix_path.exists():
                start = time.perf_counter()
                counts = sparse_count_corpus(n_cells, n_genes, args.density, seed=0)
                sp.save_npz(matrix_path, counts, compressed=False)
                print(
                    f"generated {n_cells} x {n_genes} ({counts.nnz / counts.shape[0] / counts.shape[1]:.3f} dense) in {time.perf_counter() - start:.0f} s",
                    flush=True,
                )
                del counts
            row = {"cells": n_cells, "genes": n_genes, "density": args.density, "top_k": args.top_k}
            base = [
                sys.executable,
                __file__,
                "--matrix",
                str(matrix_path),
                "--top-k",
                str(args.top_k),
                "--block-size",
                str(args.block_size),
            ]
            if args.kernel_check:
                row["kernel"] = subprocess_json([*base, "--worker", "kernel"], args.threads)
            partners = {}
            dense_gb = 4 * (n_cells * n_genes + 2 * n_genes**2) / 1e9
            for method in ("stinfer", "dense"):
                if method == "dense" and dense_gb > args.dense_max_gb:
                    row[method] = {
                        "skipped": f"needs ~{dense_gb:.1f} GB > --dense-max-gb {args.dense_max_gb}"
                    }
                    continue
                partners_path = cache / f"partners_{method}_{n_cells}x{n_genes}.npy"
                row[method] = subprocess_json(
                    [*base, "--worker", method, "--partners", str(partners_path)], args.threads
                )
                if "error" not in row[method]:
                    partners[method] = np.load(partners_path)
            if len(partners) == 2:
                same = [
                    set(a) == set(b)
                    for a, b in zip(partners["stinfer"], partners["dense"], strict=True)
                ]
                row["top_k_sets_agree"] = float(np.mean(same))
            rows.append(row)
            print(json.dumps(row), flush=True)
    print_table(rows)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


def print_table(rows: list[dict]) -> None:
    def cell(result: dict) -> str:
        if "skipped" in result:
            return "skipped (memory)"
        if "error" in result:
            return f"error: {result['error'][:40]}"
        return f"{result['seconds']:.1f} s, peak {result['peak_rss_gb']:.2f} GB (+{result['build_extra_gb']:.2f})"

    print(
        "\n| genes | cells | stinfer (time, peak RSS, +build) | dense numpy (time, peak RSS, +build) | same top-K |"
    )
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        agree = f"{row['top_k_sets_agree']:.4f}" if "top_k_sets_agree" in row else "-"
        print(
            f"| {row['genes']} | {row['cells']} | {cell(row['stinfer'])} | {cell(row['dense'])} | {agree} |"
        )


if __name__ == "__main__":
    main()
