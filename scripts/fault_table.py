"""Print the fault matrix (tests/test_faults.py, and tests/test_postcopy.py's faults after
the resume: the `postcopy` row) as a table: step x fault -> outcome.

usage: python scripts/fault_table.py [RESULTS.jsonl] [--markdown]

Each cell: what the migration's report said ("agent died": the source agent
was killed and no report came), "via stop-and-copy" when a failed pre-copy
round made it fall back to one stop-and-copy, "→" how the migration settled when that
differs, in brackets what it took ("restart": the dead agent was started
again, "recover": `phaul recover` settled it), then where the one running
copy is (α alpha, the source; β beta, the destination), or ": container lost"
when none runs (post-copy's rule: a page source lost for good after the resume
kills the destination's copy rather than let it read zeros). A failed case shows
FAIL; "-" marks a fault that cannot happen at that step (no image yet, no
CRIU running there, no page handler before post-copy).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from phaul.testing.faults import MATRIX_STEPS as STEPS

SHORT = {"rolled_back": "rolled back", "no report: agent killed": "agent died", "in_doubt": "in doubt", "refused": "refused"}
WHERE = {"alpha": "α", "beta": "β"}
# The columns, in this order (a fault not named here follows, in the order its cases ran).
FAULTS = (
    "dest agent killed", "source agent killed", "link cut 5 s", "link cut for good", "damaged image",
    "source CRIU killed", "dest CRIU killed", "dest disk full",
    "source page source killed", "destination page handler killed",  # post-copy's only
)
# The rows: the matrix's step boundaries, then the post-copy window (after the resume,
# pages still arriving), shown when its cases ran.
EXTRA_STEPS = ("postcopy",)


def cell(row: dict) -> str:
    """e.g. "rolled back α", "in doubt → ok [restart, recover] β"."""
    if not str(row.get("outcome", "")).startswith("pass"):
        return "FAIL"
    report, final = row.get("report", "?"), row.get("journal", "?")
    text = SHORT.get(report, report)
    if row.get("fell_back"):
        text += " via stop-and-copy"
    if final != report:
        text += " → " + SHORT.get(final, final)
    then = (["restart"] if row.get("restarted") else []) + (["recover"] if row.get("recovered") else [])
    if then:
        text += f" [{', '.join(then)}]"
    runs_on = "".join(WHERE.get(h, h) for h in row.get("runs_on", []))
    return f"{text} {runs_on}" if runs_on else f"{text}: container lost"


def main(argv: list[str]) -> int:
    markdown = "--markdown" in argv
    paths = [a for a in argv if not a.startswith("--")]
    path = Path(paths[0]) if paths else Path(__file__).resolve().parents[1] / ".pytest_cache" / "fault-matrix.jsonl"
    if not path.exists():
        print(f"no fault matrix results in {path}: run `make test-faults`", file=sys.stderr)
        return 1
    rows = {}
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        rows[(r["step"], r["fault"])] = r
    ran = list(dict.fromkeys(fault for _, fault in rows))  # in the order the cases ran
    faults = [f for f in FAULTS if f in ran] + [f for f in ran if f not in FAULTS]
    ran_steps = {step for step, _ in rows}
    steps = [*STEPS, *(s for s in EXTRA_STEPS if s in ran_steps), *sorted(ran_steps - set(STEPS) - set(EXTRA_STEPS))]
    cells = {k: cell(r) for k, r in rows.items()}
    widths = [max([len("step")] + [len(s) for s in steps])] + [
        max([len(f)] + [len(cells.get((s, f), "-")) for s in steps]) for f in faults
    ]
    header = ["step", *faults]
    lines = []
    if markdown:
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join("---" for _ in header) + "|")
        for s in steps:
            lines.append("| " + " | ".join([s, *[cells.get((s, f), "-") for f in faults]]) + " |")
    else:
        lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
        for s in steps:
            values = [s, *[cells.get((s, f), "-") for f in faults]]
            lines.append("  ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)))
    passed = sum(1 for r in rows.values() if str(r.get("outcome", "")).startswith("pass"))
    seconds = sum(float(r.get("seconds", 0)) for r in rows.values())
    doubt = sum(1 for r in rows.values() if r.get("report") == "in_doubt")
    lines.append(
        f"{len(rows)} cases: {passed} passed, {len(rows) - passed} failed; {doubt} ended in doubt and were settled by "
        f"`phaul recover` or the agents' resolvers; {seconds:.0f} s of cases"
    )
    print("\n".join(lines))
    return 0 if passed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
