"""``capsfus stats``: the paper's Table 3 for a run: rows, mean words per caption and unique
word trigrams of the raw, synthetic and fused captions, plus length histograms and plots.

How words and trigrams are counted (exactly this, everywhere):

- a *caption* is a row's value when it is a string (an empty string is a caption of 0 words;
  null or absent is no caption);
- its *words* are Python's ``str.split()``: maximal runs of non-whitespace characters,
  separated by any Unicode whitespace. Case and punctuation are kept ("Dog." and "dog" are
  two words). This definition reproduces the means published with the CapsFusion 10k sample
  (10.82 / 8.96 / 22.75 for raw / synthetic / fused); splitting on single spaces or counting
  runs of letters and digits does not (10.95 / 8.96 / 22.75 and 11.08 / 8.98 / 23.26);
- its *trigrams* are its runs of 3 consecutive words (``n - 2`` of them for ``n >= 3`` words,
  none otherwise); a trigram never spans two captions. *Unique trigrams* count distinct word
  triples over all the captions of one kind (raw, synthetic or fused).

Exact counting with memory bounded by one shard: each trigram becomes a 64-bit hash (each
word is hashed once with blake2b-64; the three word hashes are chained through the splitmix64
finalizer, a bijection, so the order of the words matters); each shard writes its sorted
unique hashes as ``.npy``; the shards' sorted runs are then merged range by range of hash
values (each range holds about ``budget`` hashes whatever the number of shards) and the
distinct values counted. Two distinct trigrams can share a hash: with ``n`` distinct trigrams
the expected number of such pairs is ``n(n-1)/2**65``: 0.03 for a billion trigrams, so the
count is exact in practice (an undercount, if any, of one or two).

Approximate mode (``--approx``) keeps only a HyperLogLog sketch per shard (2**p one-byte
registers, merged by maximum; relative standard error 1.04/sqrt(2**p): 0.81% at p = 14),
for 100M+ rows where even the sorted runs are too much disk. The exact mode reports the
HyperLogLog estimate beside the exact count, so its error is measured on every run.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from ..errors import UserError

STATS_VERSION = 1
FIELDS = ("raw", "synthetic", "fused")
HIST_MAX = 256                       # histogram bins: 0 … 255 words, and 256 = "256 or more"
DEFAULT_PRECISION = 14
MERGE_BUDGET = 1 << 22               # hashes per merge range (32 MB)
BATCH_ROWS = 20_000
LABELS = {"raw": "Raw alt-text (LAION-2B)", "synthetic": "Synthetic (LAION-COCO)",
          "caption": "Exported `caption` (the mix)",
          "fused": "Fused (CapsFusion)"}
PAPER_TABLE3_MEAN_WORDS = {"raw": 10.95, "synthetic": 8.99, "fused": 22.74}
PAPER_NAMES = {"raw": "LAION-2B", "synthetic": "LAION-COCO", "fused": "CapsFus-120M"}

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_C1, _C2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def words(text: str) -> list[str]:
    """The words of a caption: ``str.split()``."""
    return text.split()


def mix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer (a bijection of uint64), vectorised."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * _C1
        x = (x ^ (x >> np.uint64(27))) * _C2
        return x ^ (x >> np.uint64(31))


def word_hash(word: str) -> int:
    return int.from_bytes(hashlib.blake2b(word.encode("utf-8", "surrogatepass"),
                                          digest_size=8).digest(), "little")


def trigram_hashes(captions_words: list[list[str]], cache: dict | None = None) -> np.ndarray:
    """64-bit hashes of every word trigram of every caption (uint64, in caption order)."""
    cache = {} if cache is None else cache
    flat: list[int] = []
    lens = np.fromiter((len(w) for w in captions_words), dtype=np.int64,
                       count=len(captions_words))
    for ws in captions_words:
        for w in ws:
            h = cache.get(w)
            if h is None:
                h = cache[w] = word_hash(w)
            flat.append(h)
    n_tri = np.maximum(lens - 2, 0)
    total = int(n_tri.sum())
    if total == 0:
        return np.zeros(0, dtype=np.uint64)
    arr = np.array(flat, dtype=np.uint64)
    starts = np.cumsum(lens) - lens
    first = np.repeat(starts, n_tri)
    offs = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(n_tri) - n_tri, n_tri)
    idx = first + offs
    with np.errstate(over="ignore"):
        h = mix64(arr[idx] + _GOLDEN)
        h = mix64(h ^ arr[idx + 1])
        return mix64(h ^ arr[idx + 2])


def sorted_unique(a: np.ndarray) -> np.ndarray:
    """Sorted distinct values (sort + neighbour compare: for uint64 hashes much faster than
    numpy 2's hash-based ``np.unique``)."""
    if len(a) == 0:
        return np.zeros(0, dtype=np.uint64)
    a = np.sort(a)
    keep = np.empty(len(a), dtype=bool)
    keep[0] = True
    np.not_equal(a[1:], a[:-1], out=keep[1:])
    return a[keep]


# ------------------------------------------------------------------------------ HyperLogLog
def _bit_length(w: np.ndarray) -> np.ndarray:
    """Exact bit length of uint64 values (via two exact 32-bit float conversions)."""
    hi = (w >> np.uint64(32)).astype(np.float64)
    lo = (w & np.uint64(0xFFFFFFFF)).astype(np.float64)
    _, ehi = np.frexp(hi)
    _, elo = np.frexp(lo)
    return np.where(hi > 0, 32 + ehi, elo)


class HyperLogLog:
    """HyperLogLog over 64-bit hashes (Flajolet et al. 2007, small-range correction by
    linear counting; no large-range correction is needed with 64-bit hashes)."""

    def __init__(self, p: int = DEFAULT_PRECISION, registers: np.ndarray | None = None):
        if not 4 <= p <= 18:
            raise UserError(f"HyperLogLog precision {p}: use 4 to 18")
        self.p, self.m = p, 1 << p
        self.reg = np.zeros(self.m, np.uint8) if registers is None else registers.astype(np.uint8)

    def add(self, hashes: np.ndarray) -> None:
        if len(hashes) == 0:
            return
        h = np.asarray(hashes, dtype=np.uint64)
        idx = (h >> np.uint64(64 - self.p)).astype(np.intp)
        w = h & np.uint64((1 << (64 - self.p)) - 1)
        rank = ((64 - self.p) - _bit_length(w) + 1).astype(np.uint8)
        np.maximum.at(self.reg, idx, rank)

    def merge(self, other: "HyperLogLog") -> None:
        if other.p != self.p:
            raise ValueError("cannot merge sketches of different precision")
        np.maximum(self.reg, other.reg, out=self.reg)

    def estimate(self) -> float:
        m = self.m
        alpha = 0.7213 / (1 + 1.079 / m)
        e = alpha * m * m / float(np.sum(np.ldexp(1.0, -self.reg.astype(np.int64))))
        zeros = int(np.count_nonzero(self.reg == 0))
        if e <= 2.5 * m and zeros:
            e = m * math.log(m / zeros)
        return e

    @property
    def std_error(self) -> float:
        return 1.04 / math.sqrt(self.m)


# --------------------------------------------------------------------------- per shard
def _new_acc(p: int) -> dict:
    return {"captions": 0, "words": 0, "max_words": 0, "hist": np.zeros(HIST_MAX + 1, np.int64),
            "runs": [], "hll": HyperLogLog(p)}


def _flush(acc: dict, texts: list[str], cache: dict, approx: bool) -> None:
    ws = [t.split() for t in texts]
    lens = np.fromiter((len(w) for w in ws), dtype=np.int64, count=len(ws))
    acc["captions"] += len(ws)
    acc["words"] += int(lens.sum())
    if len(lens):
        acc["max_words"] = max(acc["max_words"], int(lens.max()))
    acc["hist"] += np.bincount(np.minimum(lens, HIST_MAX), minlength=HIST_MAX + 1)
    h = trigram_hashes(ws, cache)
    acc["hll"].add(h)
    if not approx:
        acc["runs"].append(sorted_unique(h))


def shard_stats(rows: Iterable[dict], columns: dict[str, str | None], run_prefix: Path | None,
                approx: bool = False, p: int = DEFAULT_PRECISION,
                batch: int = BATCH_ROWS) -> dict:
    """Counts, length histograms and trigram sketches of one shard's rows. Unless ``approx``,
    writes the shard's sorted unique trigram hashes to ``<run_prefix>.<field>.npy``."""
    accs = {f: _new_acc(p) for f, c in columns.items() if c}
    bufs: dict[str, list[str]] = {f: [] for f in accs}
    cache: dict[str, int] = {}
    n_rows = 0
    for row in rows:
        n_rows += 1
        for f in accs:
            v = row.get(columns[f])
            if isinstance(v, str):
                bufs[f].append(v)
        if n_rows % batch == 0:
            for f in accs:
                _flush(accs[f], bufs[f], cache, approx)
                bufs[f] = []
    out: dict = {"rows": n_rows, "fields": {}}
    for f, acc in accs.items():
        _flush(acc, bufs[f], cache, approx)
        entry = {"captions": acc["captions"], "words": acc["words"],
                 "max_words": acc["max_words"], "hist": acc["hist"].tolist(),
                 "hll": acc["hll"].reg}
        if not approx:
            u = sorted_unique(np.concatenate(acc["runs"])) if acc["runs"] else \
                np.zeros(0, np.uint64)
            path = Path(f"{run_prefix}.{f}.npy")
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            with open(tmp, "wb") as fh:
                np.save(fh, u)
            tmp.replace(path)
            entry["run_file"] = path.name
            entry["shard_unique_trigrams"] = int(len(u))
        out["fields"][f] = entry
    return out


# ------------------------------------------------------------------------------ merging
def _npy_data_offset(path: Path) -> tuple[int, int]:
    """(byte offset of the data, number of uint64 values) of a 1-d ``.npy`` file."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
            np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
        if dtype != np.dtype("<u8") or len(shape) != 1:
            raise ValueError(f"{path}: not a 1-d uint64 array")
        return f.tell(), shape[0]


def count_unique_sorted_runs(paths: list[Path], budget: int = MERGE_BUDGET) -> int:
    """Distinct values over sorted unique uint64 runs (one ``.npy`` per shard), merged range
    by range of values: memory about ``budget`` values, whatever the number of runs; one file
    open at a time."""
    metas = [(p, *_npy_data_offset(p)) for p in paths]
    total = sum(n for _, _, n in metas)
    if total == 0:
        return 0
    nb = max(1, math.ceil(total / budget))
    edges = [(k << 64) // nb for k in range(nb + 1)]
    # positions of every range edge in every run (one memory map at a time)
    cuts = []
    for p, off, n in metas:
        if n == 0:
            cuts.append(np.zeros(nb + 1, np.int64))
            continue
        a = np.memmap(p, dtype="<u8", mode="r", offset=off, shape=(n,))
        pos = np.searchsorted(a, np.array(edges[:-1], dtype=np.uint64), side="left")
        cuts.append(np.append(pos, n).astype(np.int64))
        del a
    unique = 0
    for k in range(nb):
        parts = []
        for (p, off, n), c in zip(metas, cuts):
            i, j = int(c[k]), int(c[k + 1])
            if j > i:
                with open(p, "rb") as f:
                    f.seek(off + 8 * i)
                    parts.append(np.fromfile(f, dtype="<u8", count=j - i))
        if parts:
            unique += int(len(sorted_unique(np.concatenate(parts))))
    return unique


# ------------------------------------------------------------------------------ a run
def _shard_source(run, manifest: dict, stage: str, shard: int):
    """(rows iterator factory, checksum key) of a shard of ``stage``; None if not done."""
    from ..rundir.stage import StageDir, input_rows
    if stage == "input":
        e = manifest["shards"][shard]
        return (lambda: input_rows(run, manifest, "input", shard)), e["sha256"]
    sd = StageDir(run, stage)
    st = sd.read_state(shard)
    if not st or st.get("status") != "done" or not st.get("final"):
        return None
    return (lambda: sd.iter_rows(shard)), st["final"]["out"]["sha256"]


def _shard_task(args: tuple) -> tuple[int, dict]:
    run_dir, stage, shard, columns, approx, p, cache_dir = args
    from ..rundir.io import atomic_write_json, read_json
    from ..rundir.manifest import Run
    run = Run(Path(run_dir))
    manifest = run.manifest()
    src = _shard_source(run, manifest, stage, shard)
    if src is None:
        return shard, None
    make_rows, sha = src
    key = {"version": STATS_VERSION, "sha256": sha, "columns": columns, "approx": approx,
           "p": p}
    meta = Path(cache_dir) / f"{shard:05d}.json"
    if meta.exists():
        try:
            old = read_json(meta)
            if old.get("key") == key and all(
                    (Path(cache_dir) / e["run_file"]).exists() for e in old["fields"].values()
                    if "run_file" in e):
                for e in old["fields"].values():
                    e["hll"] = np.load(Path(cache_dir) / e["hll_file"])
                return shard, old
        except (OSError, ValueError, KeyError):
            pass
    res = shard_stats(make_rows(), columns, Path(cache_dir) / f"{shard:05d}", approx, p)
    for f, e in res["fields"].items():
        hll_file = f"{shard:05d}.{f}.hll.npy"
        np.save(Path(cache_dir) / hll_file, e["hll"])
        e["hll_file"] = hll_file
    res["key"] = key
    atomic_write_json(meta, {**res, "fields": {f: {k: v for k, v in e.items() if k != "hll"}
                                               for f, e in res["fields"].items()}})
    return shard, res


def _percentile(hist: np.ndarray, q: float) -> int | None:
    total = hist.sum()
    if total == 0:
        return None
    return int(np.searchsorted(np.cumsum(hist), math.ceil(q * total)))


def merge_fields(results: list[dict], columns: dict[str, str | None], cache_dir: Path,
                 approx: bool, p: int = DEFAULT_PRECISION, budget: int = MERGE_BUDGET,
                 display: dict[str, str] | None = None) -> dict:
    """Merges the ``shard_stats`` results of several shards (their trigram runs under
    ``cache_dir``) into the per-field figures of ``stats.json``."""
    display = display or {}
    fields: dict = {}
    for f in FIELDS + tuple(c for c in columns if c not in FIELDS):
        if not columns.get(f):
            continue
        hist = np.zeros(HIST_MAX + 1, np.int64)
        captions = words_ = max_words = 0
        hll = HyperLogLog(p)
        runs = []
        for r in results:
            e = r["fields"][f]
            captions += e["captions"]
            words_ += e["words"]
            max_words = max(max_words, e["max_words"])
            hist += np.asarray(e["hist"], np.int64)
            hll.merge(HyperLogLog(p, e["hll"]))
            if "run_file" in e:
                runs.append(Path(cache_dir) / e["run_file"])
        est = hll.estimate()
        exact = None if approx else count_unique_sorted_runs(runs, budget)
        fields[f] = {
            "column": display.get(f) or columns[f], "row_key": columns[f], "rows": captions,
            "mean_words": words_ / captions if captions else None, "words": words_,
            "unique_trigrams": exact if exact is not None else round(est),
            "unique_trigrams_exact": exact, "unique_trigrams_hll": round(est),
            "hll_relative_error": (est - exact) / exact if exact else None,
            "median_words": _percentile(hist, 0.5), "p90_words": _percentile(hist, 0.9),
            "p99_words": _percentile(hist, 0.99), "max_words": max_words,
            "length_hist": {"bins": f"words per caption 0..{HIST_MAX - 1}, last bin "
                                    f"{HIST_MAX}+", "counts": hist.tolist()},
        }
    return fields


def compute_stats(run, stage: str, columns: dict[str, str | None], workers: int = 1,
                  approx: bool = False, p: int = DEFAULT_PRECISION,
                  progress: Callable[[int, int], None] | None = None,
                  budget: int = MERGE_BUDGET, display: dict[str, str] | None = None) -> dict:
    """Stats of the finished shards of ``stage``; ``columns`` maps raw/synthetic/fused to
    the row keys holding them (None: absent); ``display`` to the source's column names."""
    display = display or {}
    t0 = time.time()
    manifest = run.manifest()
    n = len(manifest["shards"])
    cache_dir = run.root / "stats" / "cache" / stage
    cache_dir.mkdir(parents=True, exist_ok=True)
    tasks = [(str(run.root), stage, i, columns, approx, p, str(cache_dir)) for i in range(n)]
    results: dict[int, dict] = {}
    done = 0
    if workers <= 1:
        for t in tasks:
            i, r = _shard_task(t)
            results[i] = r
            done += 1
            if progress:
                progress(done, n)
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
            for i, r in ex.map(_shard_task, tasks):
                results[i] = r
                done += 1
                if progress:
                    progress(done, n)
    shards = [i for i in range(n) if results.get(i) is not None]
    if not shards:
        raise UserError(f"stage {stage} of {run.root} has no finished shard to measure")
    fields = merge_fields([results[i] for i in shards], columns, cache_dir, approx, p, budget,
                          display)
    return {
        "format": "capsfus-stats", "version": STATS_VERSION, "run_id": manifest["run_id"],
        "run_dir": str(run.root), "stage": stage, "shards_measured": len(shards),
        "shards_total": n, "rows": sum(results[i]["rows"] for i in shards),
        "mode": "approx" if approx else "exact", "hll_precision": p,
        "hll_std_error": 1.04 / math.sqrt(1 << p),
        "definition": {
            "caption": "a row's value when it is a string (null or absent: no caption)",
            "words": "Python str.split(): runs of non-whitespace; case and punctuation kept",
            "trigram": "3 consecutive words of one caption; unique = distinct word triples "
                       "over all captions of one kind",
            "exact": "64-bit trigram hashes, sorted unique per shard, merged by value range "
                     "(expected hash collisions n^2/2^65)",
            "approx": f"HyperLogLog, 2^{p} registers, relative std error "
                      f"{1.04 / math.sqrt(1 << p):.2%}"},
        "fields": fields, "paper_table3_mean_words": PAPER_TABLE3_MEAN_WORDS,
        "seconds": round(time.time() - t0, 3),
    }


def compute_folder_stats(folder: Path, columns: dict[str, str | None], work_dir: Path,
                         approx: bool = False, p: int = DEFAULT_PRECISION) -> dict:
    """Stats of an export folder (``capsfus export``): one parquet file at a time, merged as
    for a run's shards. ``columns`` maps field names (raw, synthetic, fused, caption…) to the
    parquet columns; absent columns are skipped. Hash runs go to ``work_dir`` and are removed
    afterwards."""
    import shutil

    import pyarrow.parquet as pq
    t0 = time.time()
    files = sorted((Path(folder) / "data").glob("*.parquet"))
    if not files:
        raise UserError(f"{folder}: no data/*.parquet files")
    names = set(pq.ParquetFile(files[0]).schema_arrow.names)
    columns = {f: c for f, c in columns.items() if c in names}
    read = list(dict.fromkeys(columns.values()))
    work = Path(work_dir) / "cache"
    work.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        for i, path in enumerate(files):
            pf = pq.ParquetFile(path)
            rows = (r for b in pf.iter_batches(batch_size=BATCH_ROWS, columns=read)
                    for r in b.to_pylist())
            results.append(shard_stats(rows, columns, work / f"{i:05d}", approx, p))
        fields = merge_fields(results, columns, work, approx, p)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"format": "capsfus-stats", "version": STATS_VERSION, "folder": str(folder),
            "files": len(files), "rows": sum(r["rows"] for r in results),
            "mode": "approx" if approx else "exact", "hll_precision": p,
            "hll_std_error": 1.04 / math.sqrt(1 << p), "fields": fields,
            "paper_table3_mean_words": PAPER_TABLE3_MEAN_WORDS,
            "seconds": round(time.time() - t0, 3)}


# ------------------------------------------------------------------------------ outputs
def table3_rows(fields: dict) -> list[str]:
    """The Markdown table of Table 3 (header included) for ``stats["fields"]``."""
    lines = ["| Captions | Column | Rows | Unique word trigrams | Mean words / caption | "
             "Paper, Table 3 (mean words) |",
             "|---|---|---:|---:|---:|---|"]
    for f, e in fields.items():
        mean = f"{e['mean_words']:.2f}" if e["mean_words"] is not None else "-"
        paper = (f"{PAPER_NAMES[f]} {PAPER_TABLE3_MEAN_WORDS[f]:.2f}" if f in PAPER_NAMES
                 else "-")
        lines.append(f"| {LABELS.get(f, f)} | `{e['column']}` | {e['rows']:,} | "
                     f"{e['unique_trigrams']:,} | {mean} | {paper} |")
    return lines


def table3_markdown(stats: dict) -> str:
    lines = [
        "# Caption statistics, shaped like Table 3 of CapsFusion (arXiv 2310.20550)",
        "",
        f"Run `{stats['run_dir']}` (run {stats['run_id'][:8]}), stage `{stats['stage']}`: "
        f"{stats['rows']:,} rows in {stats['shards_measured']}/{stats['shards_total']} "
        f"shard(s). Words are whitespace-separated tokens (`str.split()`, case and "
        f"punctuation kept); a trigram is 3 consecutive words of one caption. Unique trigrams: "
        + ("exact (64-bit hashes)." if stats["mode"] == "exact" else
           f"HyperLogLog estimate (relative std error {stats['hll_std_error']:.2%})."),
        "",
        *table3_rows(stats["fields"]),
    ]
    if stats["mode"] == "exact":
        lines += ["", "HyperLogLog check (what `--approx` would report): " + "; ".join(
            f"{f} {e['unique_trigrams_hll']:,} ({e['hll_relative_error']:+.2%})"
            for f, e in stats["fields"].items() if e["hll_relative_error"] is not None) + "."]
    return "\n".join(lines) + "\n"


def plot_lengths(stats: dict, path: Path, max_words: int = 80) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for f, e in stats["fields"].items():
        counts = np.asarray(e["length_hist"]["counts"], dtype=float)
        if counts.sum() == 0:
            continue
        share = counts[:max_words + 1] / counts.sum()
        ax.step(np.arange(len(share)), share, where="mid",
                label=f"{LABELS.get(f, f)}: mean {e['mean_words']:.2f}")
    ax.set_xlabel("words per caption (whitespace tokens)")
    ax.set_ylabel("share of captions")
    ax.set_title(f"Caption lengths, {stats['rows']:,} rows (stage {stats['stage']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_filter_reasons(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rules = [r for r in report["rules"]]
    names = [f"{r['code']} ({r['action']})" for r in rules]
    counts = [r["rows"] for r in rules]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(rules) + 1.2), dpi=110)
    colors = ["tab:blue" if r["action"] == "strip" else "tab:red" for r in rules]
    ax.barh(names[::-1], counts[::-1], color=colors[::-1])
    for y, c in enumerate(counts[::-1]):
        ax.text(c, y, f" {c:,}", va="center", fontsize=8)
    ax.set_xlabel("rows (a dropped row may fail several rules)")
    ax.set_title(f"{report['stage']}: {report['dropped']:,} of {report['rows']:,} rows dropped "
                 f"({report['share_dropped']:.2%})")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_outputs(run, stats: dict, filter_stage: str | None = None) -> dict[str, Path]:
    """``RUN/stats/``: stats.json, table3.md, lengths.png and, when the run has a filter
    report, filter_reasons.png."""
    from ..rundir.io import atomic_write_bytes, atomic_write_json
    out = run.root / "stats"
    out.mkdir(parents=True, exist_ok=True)
    paths = {"stats": out / "stats.json", "table3": out / "table3.md",
             "lengths": out / "lengths.png"}
    atomic_write_json(paths["stats"], stats)
    atomic_write_bytes(paths["table3"], table3_markdown(stats).encode())
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        del paths["lengths"]
        paths["plots skipped"] = Path("matplotlib is not installed: pip install matplotlib")
        return paths
    plot_lengths(stats, paths["lengths"])
    report = run.root / (filter_stage or "filter") / "report.json"
    if report.exists():
        try:
            rep = json.loads(report.read_text())
            paths["filter_reasons"] = out / "filter_reasons.png"
            plot_filter_reasons(rep, paths["filter_reasons"])
        except (OSError, ValueError, KeyError):
            pass
    return paths
