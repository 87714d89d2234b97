"""The client's memory and time when `update` compares a newer listing with an output of N rows: the whole listing
read on the client and compared (what `update` did with an inventory: listings.gathered, then incremental.compare),
against incremental.compare_listed (the partitions the workers wrote, one stretch of paths at a time).

Writes, under --workdir, an output's path and identity columns (parts of 4,096 rows) and a newer listing as the
workers write it (partitions of 4,096 rows in path order: the same keys, 1% new at the end, every 1,024th replaced);
then runs each comparison in a process of its own and prints its peak above the process after its imports (VmHWM).

    .venv/bin/python benchmarks/update_compare.py                          # 10^5, 10^6, 10^7 rows (some 8 minutes)
    .venv/bin/python benchmarks/update_compare.py --rows 100000 1000000    # a try
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PART = 4096


def hwm() -> float:
    return int(re.search(r"VmHWM:\s+(\d+) kB", pathlib.Path("/proc/self/status").read_text()).group(1)) / 1024


def paths(first: int, n: int):
    import pyarrow as pa
    import pyarrow.compute as pc
    numbers = pa.array(range(first, first + n), pa.int64())
    return pc.binary_join_element_wise("photos/", pc.utf8_lpad(pc.cast(pc.divide(numbers, 1000), pa.string()), 5, "0"), "/",
                                       pc.utf8_lpad(pc.cast(numbers, pa.string()), 9, "0"), ".jpg", "")


def setup(n: int, root: pathlib.Path) -> None:
    """The output's parts (path, identity) and the newer listing's partitions file, with its parts in parts.json."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from pipeline import source
    from pipeline.making import sink
    (root / "old").mkdir(parents=True, exist_ok=True)
    for i, first in enumerate(range(0, n, PART)):
        count = min(PART, n - first)
        pq.write_table(pa.table({"path": paths(first, count), "identity": pc.cast(pa.array(range(first, first + count)), pa.string())}),
                       root / "old" / f"part-{i:05d}.parquet")
    m = n + n // 100
    numbers = pa.array(range(m))
    identity = pc.if_else(pc.equal(pc.bit_wise_and(numbers, 1023), 0), pa.scalar("new"), pc.cast(numbers, pa.string()))
    table = pa.table({"path": paths(0, m), "label": pa.repeat(pa.scalar("x"), m), "split": pa.nulls(m, pa.string()),
                      "identity": identity})
    ranges = sink.write_partitions(source.open_url(str(root), {})[0], str(root / "partitions.arrow"), table, PART)
    counts = [min(PART, m - i) for i in range(0, m, PART)]
    (root / "parts.json").write_text(json.dumps([[str(root / "partitions.arrow"), r, c] for r, c in zip(ranges, counts)]))


def measure(how: str, root: pathlib.Path) -> dict:
    """In this process: one comparison, its peak above the imports and its seconds."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pipeline import source
    from pipeline.making import incremental, listings, sink
    fs = source.open_url(str(root), {})[0]
    listed = listings.Partitions([(p, tuple(r), c) for p, r, c in json.loads((root / "parts.json").read_text())], 0)
    old = ((p.name, pq.read_table(p, columns=["path", "identity"])) for p in sorted((root / "old").glob("*.parquet")))
    errors = pd.DataFrame({c: pd.Series([], dtype=pd.ArrowDtype(pa.string())) for c in sink.ERROR_COLUMNS})
    base, started = hwm(), time.perf_counter()
    if how == "whole":
        # as listings.gathered read an inventory: its tables joined, sorted by path, made a pandas frame of Arrow strings
        table = pa.concat_tables([pa.ipc.open_stream(fs.cat_file(p, start=r[0], end=r[1])).read_all() for p, r, _ in listed.parts])
        changes = incremental.compare(table.sort_by("path").to_pandas(types_mapper=pd.ArrowDtype), old, errors)
    else:
        changes = incremental.compare_listed(fs, listed, old, errors)
    return {"above": hwm() - base, "base": base, "seconds": time.perf_counter() - started,
            "changes": [changes.added, changes.replaced, changes.removed, len(changes.featurize)]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10**5, 10**6, 10**7])
    parser.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path("/tmp/update-compare"))
    parser.add_argument("--measure", nargs=2, metavar=("HOW", "ROOT"), help=argparse.SUPPRESS)  # a child process
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure[0], pathlib.Path(args.measure[1]))))
        return 0
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    rows = []
    try:
        for n in args.rows:
            root = args.workdir / str(n)
            setup(n, root)
            for how in ("stretches", "whole"):
                done = subprocess.run([sys.executable, __file__, "--measure", how, str(root)], env=env, capture_output=True,
                                      text=True, check=True)
                result = json.loads(done.stdout.strip().splitlines()[-1]) | {"rows": n, "how": how, "load": os.getloadavg()}
                print(result, flush=True)
                rows.append(result)
            shutil.rmtree(root, ignore_errors=True)
    finally:
        shutil.rmtree(args.workdir, ignore_errors=True)
    print("\n| old rows | compared | client peak above its imports | seconds | added, replaced, removed, to featurize | load average |")
    print("|---:|---|---:|---:|---|---|")
    for r in rows:
        what = "stretch by stretch (compare_listed)" if r["how"] == "stretches" else "whole listing on the client (before)"
        print(f"| {r['rows']:,} | {what} | {r['above']:,.0f} MiB | {r['seconds']:.1f} | {', '.join(f'{x:,}' for x in r['changes'])} | "
              f"{' '.join(f'{x:.2f}' for x in r['load'])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
