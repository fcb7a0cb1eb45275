"""The sources of a run agree: each check names the file and line it rejects.

  * a rank's exit line in `rank{R}.err` (runtime/worker_main.py: `lockstep: rank=R ...
    exit=ok|error|released ...`) agrees with its trace: `exit=ok` needs an exit step
    as the trace's last event and no cut last line;
  * a last line cut short is accepted only for a rank that was killed (its trace ends
    with no exit step and no release event): every other ending flushes its lines;
  * `outputs.json` (rank0's emitted outputs, `[chunk, epoch, digest]` in emission
    order) agrees with the replayed decode events: the same chunks and epochs in the
    same order, the same count (a prefix of them when rank0 did not exit cleanly); a
    suffix's decodes (conformance/suffix.py) are the tail of outputs.json, or a
    contiguous stretch of it when rank0 did not exit cleanly;
  * `run.json`'s configuration agrees with the traces: the backend and world each
    rank's start event records;
  * a missing rank file is the headline (`headline(run)`), not a later symptom.
"""
from __future__ import annotations

import re

from lockstep.model.tracefmt import loads

_EXIT = re.compile(r"^lockstep: rank=(\d+) .*?\bexit=(\w+)")


def err_exit(path) -> str:
    """The exit kind of the rank's last `lockstep: rank=` line in its .err, or ''."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    for line in reversed(text.splitlines()):
        mt = _EXIT.match(line)
        if mt:
            return mt.group(2)
    return ""


def headline(run) -> str:
    missing = [rt.rank for rt in run.ranks if rt.missing]
    if not missing:
        return ""
    return ("MISSING TRACE " + ", ".join(f"rank{r}.jsonl" for r in missing) +
            ": the rank wrote no trace at all (it died before tracing started, or the "
            "file was lost); everything below follows from that")


def check_sources(run, res=None) -> list:
    """Disagreements between the run's files, one string each (file and line)."""
    out = []
    for rt in run.ranks:
        r = rt.rank
        if rt.missing:
            out.append(f"rank{r}.jsonl: missing")
            continue
        kind = err_exit(run.path / f"rank{r}.err")
        last = rt.steps[-1] if rt.steps else None
        where = last.where() if last else f"rank{r}.jsonl (no steps)"
        if kind == "ok":
            if rt.truncated:
                out.append(f"rank{r}.err says exit=ok, but rank{r}.jsonl ends with a line "
                           f"cut short (after {where}): a clean exit flushes every line")
            elif last is None or last.op != "exit":
                out.append(f"rank{r}.err says exit=ok, but the trace's last step ({where}"
                           f"{': ' + last.brief() if last else ''}) is not an exit step")
        elif rt.truncated and rt.ended != "crashed":
            out.append(f"rank{r}.jsonl: last line cut short (after {where}), but the rank "
                       f"was not killed (it ended {rt.ended}): only kill -9 cuts a line")
        opts = run.meta.get("opts")
        backend = opts.get("backend") if isinstance(opts, dict) else None
        if not isinstance(backend, str):
            backend = None          # not written by this runtime: nothing to compare
        if rt.start is not None and backend and rt.start.get("backend") not in (None, backend):
            out.append(f"{rt.start['_file']} line {rt.start['_line']}: backend "
                       f"{rt.start.get('backend')!r}, but run.json says {backend!r}")
    out += _outputs(run, res)
    return out


def _outputs(run, res):
    p = run.path / "outputs.json"
    if res is None or res.divergence is not None or not p.exists():
        return []
    try:
        outs = loads(p.read_text())
    except ValueError as e:
        return [f"outputs.json: not JSON ({e})"]
    if not isinstance(outs, list):
        return ["outputs.json: not a list"]
    got = [(o[0], o[1]) for o in outs if isinstance(o, list) and len(o) >= 2
           and type(o[0]) is int and type(o[1]) is int]   # not a bool: false == 0
    if len(got) != len(outs):
        return ["outputs.json: every entry is [chunk, epoch, digest]"]
    want = [(c, e) for c, e, _ in res.emitted]
    clean = run.ranks[0].ended == "exit"
    if run.start is not None and want:   # a suffix: its decodes come after the cut's
        at = len(got) - len(want) if clean else next(
            (k for k in range(len(got) - len(want) + 1) if got[k:k + len(want)] == want), 0)
        if at < 0:
            return [f"outputs.json has {len(got)} outputs, the suffix decodes {len(want)}"]
        got, base = got[at:], at
    else:
        base = 0
    for j, (a, b) in enumerate(zip(got, want)):
        if a != b:
            return [f"outputs.json entry {base + j}: chunk {a[0]} epoch {a[1]}, but "
                    f"decode #{j}{' of the suffix' if base else ''} in the traces emits "
                    f"chunk {b[0]} epoch {b[1]}"]
    if len(got) > len(want) or (clean and len(got) != len(want)):
        return [f"outputs.json has {len(got)} outputs, the traces decode {len(want)}"]
    return []
