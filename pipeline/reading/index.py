"""Index: the output's nearest images, a faiss index of its PCA rows, built with the output and searched by recognize.

    index/index.faiss   faiss's own serialization (faiss.write_index): read memory-mapped, no pickle
    index/rows.arrow    row id → path, label (an uncompressed Arrow IPC file: memory-mapped too)
    index/index.json    what it is: kind, faiss factory string, parameters, rows, bytes, build seconds,
                        recall@5 and @10 against an exact search on held-out rows (also in the manifest)

A row's id is its position in images.parquet/, part after part in name order. The kind follows the
size (pipeline.yaml's `index`): an exact IndexFlatL2 below `exact-below` rows; above, an IVF index
(k-means lists, a few searched per query) of 8-bit scalar codes (k bytes a row), or of PQ codes
(k / 4 bytes a row) above `codes-above`, as autofaiss chooses for LAION's billions. Its k-means and
codes are trained on a sample of the parts, then every part is added one after another, so that the
vectors are never all held: only the index's codes are. Held-out rows searched both ways give the
recall, and the fewest lists searched (`nprobe`) that reach `recall-target`.

`run` and `update` build it in their shared flow (job.featurize_fit_write) from the parts they wrote:
an update projects every row again with its refitted PCA, so every vector of the index changes,
and the whole index is made again from the new parts (added rows in it, removed rows not).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import tempfile
import time

import dask.config
import faiss
import numpy as np
import pyarrow as pa

from .. import config, source
from ..making import sink
from ..config import UsageError

FILE, ROWS, ABOUT = "index.faiss", "rows.arrow", "index.json"
ROWS_SCHEMA = pa.schema([("path", pa.string()), ("label", pa.string())])
RECALL_AT = (5, 10)
READ_FLAGS = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY  # codes memory-mapped: flat and IVF alike (faiss ≥ 1.11)


def setting(name: str) -> float:
    value = dask.config.get(f"pipeline.index.{name}")
    return float(value) if name == "recall-target" else config.positive_int(f"index.{name}", value)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Which index an output of `rows` rows of `width` PCA coordinates gets."""

    kind: str  # "flat" (exact), "ivf-sq8", "ivf-pq"
    factory: str  # faiss.index_factory's description
    lists: int = 0  # IVF lists (k-means centroids); 0 for flat

    @classmethod
    def of(cls, rows: int, width: int) -> "Plan":
        if rows < setting("exact-below"):
            return cls("flat", "Flat")
        lists = 2 ** round(math.log2(max(1.0, setting("lists-per-sqrt-rows") * math.sqrt(rows))))
        lists = max(1, min(lists, rows // 39))  # faiss's k-means wants 39 points a centroid at least
        if rows < setting("codes-above"):
            return cls("ivf-sq8", f"IVF{lists},SQ8", lists)
        m = max(d for d in range(1, width + 1) if width % d == 0 and d <= max(1, width // 4))  # PQ: sub-vectors of ≥ 4 dims
        quantizer = f"IVF{lists}_HNSW32" if lists >= 1 << 16 else f"IVF{lists}"  # many centroids: find them by a graph
        return cls("ivf-pq", f"{quantizer},PQ{m}x8", lists)

    def training_rows(self, rows: int) -> int:
        return 0 if self.kind == "flat" else min(rows, self.lists * setting("training-rows-per-list"))


# --- building ----------------------------------------------------------------------------------------


def build(fs, folder: str, parts: list[str], width: int, rows: int, say=lambda message: None) -> dict:
    """Build the index of the rows of `parts` (images.parquet/ files, in order) into `folder`; returns its index.json.

    `rows`: how many the parts hold (the manifest's written count), which chooses the kind. The
    recall is tuned for recognize's default number of neighbours.
    """
    started = time.perf_counter()
    neighbours = config.positive_int("recognize.neighbours", dask.config.get("pipeline.recognize.neighbours"))
    plan = Plan.of(rows, width)
    index = faiss.index_factory(width, plan.factory)
    if plan.kind != "flat":
        faiss.extract_index_ivf(index).cp.niter = setting("kmeans-iterations")
    training, queries = sample(fs, parts, plan.training_rows(rows), setting("recall-queries"))
    if training is not None:
        say(f"index: training {plan.factory} on {len(training):,} rows")
        index.train(training)
    del training
    truth = Truth(queries, max(RECALL_AT) + 1) if plan.kind != "flat" else None
    sink.make_folder(fs, folder)
    sink.publish(fs, f"{folder}/{ROWS}", lambda f: add_parts(fs, parts, index, f, truth))
    about = {"kind": plan.kind, "factory": plan.factory, "rows": int(index.ntotal), "width": width,
             "parameters": {"lists": plan.lists, "nprobe": 0},
             "recall": {f"@{k}": 1.0 for k in RECALL_AT} if plan.kind == "flat" else None, "recall_queries": 0}
    if truth is not None and len(truth.ids):
        nprobe, recall = tuned_nprobe(index, truth, neighbours)
        about["parameters"]["nprobe"], about["recall"], about["recall_queries"] = nprobe, recall, len(truth.ids)
    sink.publish(fs, f"{folder}/{FILE}", lambda f: faiss.write_index(index, faiss.PyCallbackIOWriter(f.write)))
    about["bytes"] = int(sum(fs.size(f"{folder}/{name}") for name in (FILE, ROWS)))
    about["build_s"] = round(time.perf_counter() - started, 3)
    sink.write_json(fs, f"{folder}/{ABOUT}", about)
    return about


def read_part(fs, part: str, width: int | None = None, columns=("path", "label", "pca")) -> tuple[pa.Table, np.ndarray]:
    table = sink.read_parquet(fs, part, list(columns))
    column = table["pca"].combine_chunks()
    width = width or (len(column[0]) if len(column) else 0)
    return table, np.ascontiguousarray(sink.matrix(column, width), np.float32)


def sample(fs, parts: list[str], n_training: int, n_queries: int) -> tuple[np.ndarray | None, "Queries"]:
    """A seeded training sample of about `n_training` rows, and `n_queries` held-out rows to measure recall with.

    Read from parts spread evenly over the output (its rows are sorted by path, so by label):
    training rows from some, queries from others, each part read whole or not at all.
    """
    if not n_training:
        return None, Queries({}, np.zeros((0, 0), np.float32))
    rng = np.random.default_rng(0)
    order = rng.permutation(len(parts))
    chunks, held, got = [], {}, 0
    query_parts = order[: max(1, min(len(parts) // 10, n_queries // 8))] if len(parts) > 1 else order[:0]
    for number in order[len(query_parts):]:
        if got >= n_training:
            break
        _, vectors = read_part(fs, parts[number], columns=("pca",))
        chunks.append(vectors)
        got += len(vectors)
    training = np.concatenate(chunks)
    if len(training) > n_training:
        training = training[np.sort(rng.choice(len(training), n_training, replace=False))]
    per_part = math.ceil(n_queries / max(1, len(query_parts)))
    for number in query_parts:
        _, vectors = read_part(fs, parts[number], columns=("pca",))
        chosen = np.sort(rng.choice(len(vectors), min(per_part, len(vectors)), replace=False))
        held[int(number)] = (chosen, vectors[chosen])
    return training, Queries(held, np.zeros((0, training.shape[1]), np.float32))


@dataclasses.dataclass
class Queries:
    """Held-out rows: by part number, their positions in the part and their vectors."""

    by_part: dict
    vectors: np.ndarray


class Truth:
    """The exact nearest rows of the held-out queries, found part by part as the parts are added."""

    def __init__(self, queries: Queries, k: int):
        self.queries, self.k = queries, k
        parts = sorted(queries.by_part)
        self.vectors = np.concatenate([queries.by_part[p][1] for p in parts]) if parts else queries.vectors
        self.order = parts
        self.ids = np.full(len(self.vectors), -1, np.int64)
        self.heap = faiss.ResultHeap(len(self.vectors), k) if len(self.vectors) else None

    def add(self, number: int, first_id: int, vectors: np.ndarray) -> None:
        if self.heap is None or not len(vectors):
            return
        if number in self.queries.by_part:
            at = sum(len(self.queries.by_part[p][0]) for p in self.order[: self.order.index(number)])
            positions = self.queries.by_part[number][0]
            self.ids[at : at + len(positions)] = first_id + positions
        add_exact(self.heap, self.vectors, vectors, first_id, self.k)

    def nearest(self) -> np.ndarray:
        self.heap.finalize()
        return self.heap.I


def add_exact(heap, queries: np.ndarray, vectors: np.ndarray, first_id: int, k: int) -> None:
    """Merge into `heap` the exact k nearest of `vectors` (rows first_id, first_id + 1, ...) to each query."""
    distances, found = faiss.knn(queries, vectors, min(k, len(vectors)))
    pad = k - found.shape[1]  # a part of fewer rows than k: nothing found for the rest
    heap.add_result(np.pad(distances, ((0, 0), (0, pad)), constant_values=np.inf).astype(np.float32),
                    np.pad(found + first_id, ((0, 0), (0, pad)), constant_values=-1))


def add_parts(fs, parts: list[str], index, rows_file, truth: Truth | None) -> None:
    """Add every part's vectors to `index` (ids: their positions), writing each row's path and label to rows.arrow."""
    first = 0
    with pa.ipc.new_file(rows_file, ROWS_SCHEMA) as writer:
        for number, part in enumerate(parts):
            table, vectors = read_part(fs, part, index.d)
            if not len(vectors):
                continue
            ids = np.arange(first, first + len(vectors), dtype=np.int64)
            if isinstance(index, faiss.IndexFlat):
                index.add(vectors)  # its ids are the positions already
            else:
                index.add_with_ids(vectors, ids)
            if truth is not None:
                truth.add(number, first, vectors)
            writer.write_table(table.select(["path", "label"]).cast(ROWS_SCHEMA))
            first += len(vectors)


def recall(found: np.ndarray, exact: np.ndarray, ids: np.ndarray, k: int) -> float:
    """Mean share of the exact k nearest found among the k found, each query's own row left out of both."""
    shares = []
    for query, got, want in zip(ids, found, exact):
        got, want = [i for i in got if i != query and i >= 0][:k], [i for i in want if i != query and i >= 0][:k]
        shares.append(len(set(got) & set(want)) / max(1, len(want)))
    return float(np.mean(shares))


def tuned_nprobe(index, truth: Truth, neighbours: int) -> tuple[int, dict]:
    """The fewest lists searched (1, 2, 3, 4, 6, 8, 11, 16, ...: steps of √2) whose recall@`neighbours` on the
    held-out rows reaches `recall-target`."""
    exact, target = truth.nearest(), setting("recall-target")
    ivf = faiss.extract_index_ivf(index)
    nprobe = 1
    while True:
        ivf.nprobe = nprobe
        _, found = index.search(truth.vectors, truth.k)
        measured = {f"@{k}": round(recall(found, exact, truth.ids, k), 4) for k in RECALL_AT}
        if recall(found, exact, truth.ids, neighbours) >= target or nprobe >= ivf.nlist:
            return nprobe, measured
        nprobe = min(max(nprobe + 1, round(nprobe * math.sqrt(2))), ivf.nlist)


# --- searching ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Nearest:
    """The k nearest rows of some queries: q × k arrays, nearest first (row -1, path None where fewer rows)."""

    distances: np.ndarray
    rows: np.ndarray
    paths: np.ndarray
    labels: np.ndarray


class SearchIndex:
    """A finished output's index, memory-mapped: `search` answers from it, `exact` scans the parts for checks."""

    def __init__(self, folder: str, about: dict):
        self.about = about
        self.index = faiss.read_index(f"{folder}/{FILE}", READ_FLAGS)
        if about["parameters"].get("nprobe"):
            faiss.extract_index_ivf(self.index).nprobe = about["parameters"]["nprobe"]
        reader = pa.ipc.open_file(pa.memory_map(f"{folder}/{ROWS}"))  # zero-copy on the mapped file: a batch a part
        self.batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
        self.starts = np.cumsum([0] + [batch.num_rows for batch in self.batches])

    @classmethod
    def load(cls, fs, root: str, version: str) -> "SearchIndex":
        """The index of the output at `root` (its files copied to a local cache first where it is not on this disk)."""
        folder = f"{root}/{sink.INDEX}"
        if not fs.exists(f"{folder}/{ABOUT}"):
            url = source.full_url(fs, root)
            raise UsageError(f"{url} has no {sink.INDEX}/ (made by an earlier version of the pipeline): make it again with "
                             f"`python -m pipeline run --overwrite --output {url}` and its input")
        return opened(fs, folder, version)

    @property
    def rows(self) -> pa.Table:
        """Every row's path and label, by row id (not copied)."""
        return pa.Table.from_batches(self.batches, ROWS_SCHEMA)

    def search(self, vectors: np.ndarray, k: int) -> Nearest:
        distances, rows = self.index.search(np.ascontiguousarray(vectors, np.float32), k)
        return self.named(distances, rows)

    def exact(self, fs, parts: list[str], vectors: np.ndarray, k: int) -> Nearest:
        """The exact k nearest rows, by a scan of every part in this process, one part at a time (slow at scale: for checks)."""
        heap, first = faiss.ResultHeap(len(vectors), k), 0
        queries = np.ascontiguousarray(vectors, np.float32)
        for part in parts:
            _, found = read_part(fs, part, self.index.d, columns=("pca",))
            if len(found):
                add_exact(heap, queries, found, first, k)
                first += len(found)
        heap.finalize()
        return self.named(heap.D, heap.I)

    def named(self, distances: np.ndarray, rows: np.ndarray) -> Nearest:
        """Squared distances and row ids as Euclidean distances, paths and labels (rows not found dropped)."""
        keep = rows[0] >= 0 if len(rows) else np.zeros(0, bool)
        rows, distances = rows[:, keep], distances[:, keep]
        paths, labels = self.lookup(rows.ravel())
        return Nearest(np.sqrt(np.maximum(distances, 0)), rows, paths.reshape(rows.shape), labels.reshape(rows.shape))

    def lookup(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The paths and labels of these row ids, each read from its own batch (a take of the whole
        table would gather every batch into one at each call: 14.6 ms of CPU a query at 10⁶ rows, 1.4 without)."""
        paths, labels = np.empty(len(ids), object), np.empty(len(ids), object)
        for at, (batch, row) in enumerate(zip(np.searchsorted(self.starts, ids, side="right") - 1, ids)):
            paths[at] = self.batches[batch].column(0)[row - self.starts[batch]].as_py()
            labels[at] = self.batches[batch].column(1)[row - self.starts[batch]].as_py()
        return paths, labels


@functools.lru_cache(maxsize=4)
def opened(fs, folder: str, version: str) -> SearchIndex:
    """One SearchIndex per output version and process (a worker answering many partitions loads it once)."""
    local = local_folder(fs, folder, version)
    with open(f"{local}/{ABOUT}") as f:
        return SearchIndex(local, json.load(f))


def local_folder(fs, folder: str, version: str) -> str:
    """The index folder on this machine's disk: itself if local, else a copy in the temp folder kept per version."""
    if source.is_local(fs):
        return folder
    copy = os.path.join(tempfile.gettempdir(), "pipeline-index", hashlib.sha256(f"{folder}@{version}".encode()).hexdigest()[:16])
    if not os.path.exists(f"{copy}/{ABOUT}"):
        partial = f"{copy}.{os.getpid()}.partial"
        os.makedirs(partial, exist_ok=True)
        for name in (FILE, ROWS, ABOUT):
            fs.get_file(f"{folder}/{name}", f"{partial}/{name}")
        with contextlib.suppress(OSError):  # another process copied it first: theirs is the same
            os.rename(partial, copy)
    return copy
