"""The sources of a run agree: each check names the file and line it rejects.

  * a rank's exit line in `rank{R}.err` (runtime/worker_main.py: `lockstep: rank=R ...
    exit=ok|error|released ...`) agrees with its trace: `exit=ok` needs an exit step
    as the trace's last event and no cut last line;
  * a rank's `.err`, where there is one, has its exit line unless the rank was killed
    or released (its watchdog's forced exit may beat the line; every other ending
    writes one, of its own rank and of a kind in model/release.py
    EXIT_CODES), and the local launcher's `launch.json` returncode of a rank it did not
    kill is the status of that kind (an unreadable `launch.json` decides nothing, and
    the report warns of it, naming the file and field);
  * a last line cut short is accepted only for a rank that was killed (its trace ends
    with no exit step and no release event): every other ending flushes its lines;
  * `outputs.json` (rank0's emitted outputs, `[chunk, epoch, digest]` in emission
    order; written whenever rank0 exits through its table, so missing in a local run
    with rank0's exit step) agrees with the replayed decode events: the same chunks and epochs in the
    same order, the same count (a prefix of them when rank0 did not exit cleanly); a
    suffix's decodes (conformance/suffix.py) are the tail of outputs.json, or a
    contiguous stretch of it when rank0 did not exit cleanly;
  * `run.json`'s configuration agrees with the traces: the backend and world each
    rank's start event records;
  * a missing rank file is the headline (`headline(run)`), not a later symptom.
"""
from __future__ import annotations

import re

from lockstep.model.release import EXIT_CODES
from lockstep.model.tracefmt import loads

_EXIT = re.compile(r"^lockstep: rank=(\d+) .*?\bexit=(\w+)")


def err_exit_line(path) -> tuple | None:
    """(rank, exit kind) of the last `lockstep: rank=` exit line in a .err, or None."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    for line in reversed(text.splitlines()):
        mt = _EXIT.match(line)
        if mt:
            return int(mt.group(1)), mt.group(2)
    return None


def err_exit(path) -> str:
    """The exit kind of the rank's last `lockstep: rank=` line in its .err, or ''."""
    line = err_exit_line(path)
    return line[1] if line else ""


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
    launch = launch_record(run.path)[0]     # unreadable: a warning of the report's
    for rt in run.ranks:
        r = rt.rank
        if rt.missing:
            out.append(f"rank{r}.jsonl: missing")
            continue
        err = run.path / f"rank{r}.err"
        line = err_exit_line(err)
        kind = line[1] if line else ""
        last = rt.steps[-1] if rt.steps else None
        where = last.where() if last else f"rank{r}.jsonl (no steps)"
        out += _exit_line_problems(rt, err, line, where, launch)
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
    out += _outputs(run, res, launch)
    return out


def launch_record(path) -> tuple:
    """(record, problem) of the local launcher's RUN_DIR/launch.json (runtime/launch.py):
    ({}, "") when there is none (torchrun, an older run); ({}, what is wrong, naming the
    file and field) when it is not JSON, not an object, or a list of ranks (killed_at_
    deadline, interrupted.killed / not_started) or its returncodes are not ints (a JSON
    false is a Python 0, and would name rank 0)."""
    p = path / "launch.json"
    if not p.exists():
        return {}, ""
    try:
        rec = loads(p.read_text())
    except (OSError, ValueError) as e:
        return {}, f"launch.json: not readable JSON ({e})"
    if not isinstance(rec, dict):
        return {}, "launch.json: not a JSON object"
    stop = rec.get("interrupted")
    fields = {"killed_at_deadline": rec.get("killed_at_deadline"),
              "returncodes": rec.get("returncodes")}
    if isinstance(stop, dict):
        fields.update({"interrupted.killed": stop.get("killed"),
                       "interrupted.not_started": stop.get("not_started")})
    for name, rs in fields.items():
        # returncodes: None for a rank that had not ended (runtime/launch.py)
        ok = (int,) + ((type(None),) if name == "returncodes" else ())
        if rs is not None and not (type(rs) is list and all(type(r) in ok for r in rs)):
            return {}, f"launch.json: field {name!r}: not a list of ints: {str(rs)[:80]}"
    return rec, ""


def launcher_killed(launch: dict) -> set:
    """The ranks the launcher killed itself (its hard deadline, a signal it was sent)."""
    stop = launch.get("interrupted") if isinstance(launch.get("interrupted"), dict) else {}
    return set(launch.get("killed_at_deadline") or ()) | set(stop.get("killed") or ())


def _exit_line_problems(rt, err, line, where, launch) -> list:
    """A rank's exit line (its .err) against its trace and the launcher's returncode."""
    r = rt.rank
    stop = launch.get("interrupted") if isinstance(launch.get("interrupted"), dict) else {}
    if launch and not err.is_file() and r not in (stop.get("not_started") or ()):
        return [f"rank{r}.err: missing, but launch.json says the local launcher started "
                f"rank {r}, whose stderr it writes there"]
    if r in launcher_killed(launch):
        return []           # killed by the launcher: it may have left no line, no status
    out = []
    if line is not None:
        if line[0] != r:
            out.append(f"rank{r}.err: its exit line is of rank {line[0]}")
        if line[1] not in EXIT_CODES:
            out.append(f"rank{r}.err: exit={line[1]} is not an exit kind "
                       f"({', '.join(EXIT_CODES)})")
    elif err.is_file() and rt.ended in ("exit", "failed"):
        # (a rank released by another's failure may leave none: its watchdog's forced
        # exit, release_grace_s after the release event, can beat the line when the
        # process stalls, as a loaded machine makes it)
        ends = {"exit": "with its exit step", "failed": "with a release event naming "
                "itself"}[rt.ended]
        out.append(f"rank{r}.err has no exit line (lockstep: rank={r} ... exit=KIND), but "
                   f"rank{r}.jsonl ends {ends} ({where}): only a killed rank leaves none")
    rcs = launch.get("returncodes") or []
    if line is not None and line[1] in EXIT_CODES and r < len(rcs) \
            and rcs[r] is not None and rcs[r] != EXIT_CODES[line[1]]:
        out.append(f"launch.json: field 'returncodes': rank {r} exited {rcs[r]}, but "
                   f"rank{r}.err says exit={line[1]} (status {EXIT_CODES[line[1]]})")
    return out


def _outputs(run, res, launch):
    p = run.path / "outputs.json"
    if res is None or res.divergence is not None:
        return []
    if not p.exists():
        # Older recordings (conformance/testdata) kept no outputs.json; a run of this
        # runtime's local launcher (its launch.json) always has one after rank0's exit.
        if launch and run.ranks[0].ended == "exit":
            return ["outputs.json: missing, but rank0.jsonl ends with its exit step and "
                    "launch.json says the local launcher ran it: rank0 writes its output "
                    "log whenever it exits through its table"]
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
