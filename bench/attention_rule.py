"""Print the rows of ops.attention's measured rule (``ATTENTION_RULE`` in
d2v_kernels/ops/attention_op.py) from a ``bench.attention`` result file, to paste over the table.

For each input class (bias kind, mode, dtype class) the cases of that class are summed per backend
(``d2v_triton``: the Triton kernel, ``d2v_sdpa``: the sdpa backend, ``eager``), and the backend with
the least total time is preferred; Triton's rows prefer nothing (the priority order runs it first).
A backend missing from a case of the class (an error, not run) leaves that class unmeasured.

    python -m bench.attention_rule bench/results/<gpu>/<date>-attention.json [--timing ms|ms_graph]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

# bench.attention's bias kinds -> the rule's; impl -> the backend it forces.
KINDS = {"table": "table", "padding": "key_padding", "none": "none"}
BACKENDS = {"d2v_triton": "triton", "d2v_sdpa": "sdpa", "eager": "eager"}
MODES = {"fwd": "inference", "fwd+bwd": "training"}
DTYPES = {"fp16": "half", "bf16": "half", "fp32": "fp32"}


def rule_rows(result: dict, timing: str = "ms") -> dict[tuple[str, str, str], tuple[tuple[str, ...], str]]:
    """``{(kind, mode, dtype): (preferred backends, evidence)}`` from a result file's rows."""
    times: dict[tuple, dict[tuple, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for row in result["rows"]:
        backend = BACKENDS.get(row.get("impl"))
        if backend is None or row.get("bias") not in KINDS or timing not in row:
            continue
        key = (KINDS[row["bias"]], MODES[row["mode"]], DTYPES.get(row["dtype"], "other"))
        times[key][(row["case"], row["dtype"])][backend] = row[timing]
    gpu = result.get("environment", {}).get("gpu", "?")
    rows = {}
    for key, cases in sorted(times.items()):
        complete = [c for c in cases.values() if len(c) == len(BACKENDS)]
        if len(complete) < len(cases):
            rows[key] = ((), f"unmeasured: a backend is missing in {len(cases) - len(complete)} case(s)")
            continue
        totals = {b: sum(c[b] for c in complete) for b in BACKENDS.values()}
        best = min(totals, key=totals.get)
        cited = "; ".join(
            f"{case} {dtype} " + ", ".join(f"{b} {t[b]:.3f}" for b in BACKENDS.values())
            for (case, dtype), t in sorted(cases.items())
        )
        rows[key] = (() if best == "triton" else (best,), f"{gpu}, {timing}: {cited}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.attention_rule", description=__doc__.split("\n\n")[0])
    parser.add_argument("result", type=Path, help="a bench.attention result JSON")
    parser.add_argument("--timing", choices=("ms", "ms_graph"), default="ms", help="eager ms (default) or graph ms")
    args = parser.parse_args(argv)
    result = json.loads(args.result.read_text())
    print(f"# from {args.result}")
    for key, (backends, evidence) in rule_rows(result, args.timing).items():
        print(f"    {key!r}: ({backends!r}, {evidence!r}),")
    return 0


if __name__ == "__main__":
    sys.exit(main())
