"""Configurations bind the constants of the protocol; they are not part of the spec.

Like the small .cfg files beside a TLA+ spec: mesh size, queue depths, chunks, faults,
p2p semantics and the recompute regime. A configuration bounds a search; the semantics
never does (counters grow without bound, so the replayer can run thousands of chunks).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from functools import cached_property

from .contract import ENVELOPE_FIELDS, expected_generator_calls

# steps is the envelope's num_denoise_steps: the contract's bounds are the config's
STEPS_BOUNDS = next(f.bounds for f in ENVELOPE_FIELDS if f.name == "num_denoise_steps")

# Faults the *runtime* can inject (its fault-injection switches). In the model,
# rank0_preflight and leader_reject need no switch: a preflight or a validation can
# fail at any envelope, so the shipped tables always allow those rows and the switch
# only arms the runtime. The last two (a message the receiver's validator refuses) are
# armed in the model too: the sender's fault row makes a message with valid=False, the
# receiver's guard reads that verdict. The middle three change a rank's local state (a wrong-group
# request, a planned count off by one, a per-rank flag), one-shot and nondeterministic
# in when they fire, so the checker covers every point.
INJECTABLE = (
    "rank0_preflight",   # rank0's preflight (serialise, dtype map) raises for one chunk
    "leader_reject",     # the leader's validation rejects one envelope
    "wrong_group",       # a mesh rank's workload asks for a Phase-B collective on world_pg
    "count_mismatch",    # one mesh rank plans expected_generator_calls + 1
    "cond_flag",         # one mesh rank has a per-rank flag that adds a collective
    "rank0_bad_envelope",  # rank0 sends one envelope the leader's validator refuses
    "leader_bad_result",   # the leader sends one result rank0's contract check refuses
)

# The faults that change one mesh rank's local state (the last mesh rank, kept out of
# the symmetry reduction, which only permutes identical workers).
ONE_RANK_FAULTS = frozenset({"wrong_group", "count_mismatch", "cond_flag"})


@dataclass(frozen=True)
class Config:
    mesh: int = 2                 # mesh ranks (leader + workers); 1 = PP0
    d_in: int = 2                 # envelopes in flight: built by rank0, result not yet
                                  # received (those the leader holds ahead count too)
    d_out: int = 2                # results waiting for decode
    leader_in: int = 1            # leader inbox: envelopes its comms thread received ahead
    leader_out: int = 1           # leader outbox: results waiting for its comms thread
    chunks: int = 2               # INFER envelopes rank0 builds
    hard_cut: int = 0             # hard cuts (epoch bump + flush) that may happen, anywhere
                                  # (True = 1); also during drain and back to back
    faults: int = 0               # crash-fault budget (kill -9 of any process at any step)
    p2p: str = "rendezvous"       # "rendezvous" (conservative NCCL) or "buffered"
    eager: int = 1                # messages a buffered channel holds before send blocks
    regime: str = "R1"            # "R1" | "R0a" | "R0"
    steps: int = 1                # num_denoise_steps
    noops: int = 0                # NOOP heartbeats rank0 may send
    inject: frozenset = field(default_factory=frozenset)  # subset of INJECTABLE
    watchdog: bool = True         # heartbeat watchdog: a crashed rank sets the abort flag
    cond_flag_all: bool = False    # a feature flag set on every rank that adds one mesh
                                   # collective after Phase B (FM-03's legitimate case:
                                   # the flags agree, so the parity handshake passes)
    mutation: str = ""            # name from model.mutations, "" = shipped protocol

    def __post_init__(self):
        # A value out of range is refused here, by name: the checker would otherwise
        # explore a configuration the runtime cannot mean (steps=0 "finds" a stranding,
        # faults=-1 silently checks no crash) and report it as a verdict on the tables.
        for name in _INTS:
            value = getattr(self, name)
            if type(value) is not int and not (name == "hard_cut" and type(value) is bool):
                raise ValueError(f"{name} must be an integer, not {value!r:.40}")
        if self.mesh < 1:
            raise ValueError("mesh must be >= 1 (the leader alone is PP0)")
        if int(self.hard_cut) < 0:
            raise ValueError(f"hard_cut must be >= 0 cuts, not {self.hard_cut!r}")
        object.__setattr__(self, "hard_cut", int(self.hard_cut))
        for name in ("chunks", "faults", "noops"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, not {getattr(self, name)}")
        if self.eager < 1:
            raise ValueError(f"eager must be >= 1 message, not {self.eager}")
        lo, hi = STEPS_BOUNDS
        if not lo <= self.steps <= hi:
            raise ValueError(f"steps must be in [{lo}, {hi}] (the contract's "
                             f"num_denoise_steps), not {self.steps}")
        for name in ("watchdog", "cond_flag_all"):
            if type(getattr(self, name)) is not bool:
                raise ValueError(f"{name} must be true or false, not "
                                 f"{getattr(self, name)!r:.40}")
        if not isinstance(self.mutation, str):
            raise ValueError(f"mutation must be a name, not {self.mutation!r:.40}")
        if min(self.d_in, self.d_out, self.leader_in, self.leader_out) < 1:
            raise ValueError("queue depths must be >= 1")
        if self.p2p not in ("rendezvous", "buffered"):
            raise ValueError(f"p2p must be rendezvous or buffered, not {self.p2p!r}")
        if self.regime not in ("R1", "R0a", "R0"):
            raise ValueError(f"unknown regime {self.regime!r}")
        bad = set(self.inject) - set(INJECTABLE)
        if bad:
            raise ValueError(f"unknown injected faults {sorted(bad)}; known: {INJECTABLE}")
        object.__setattr__(self, "inject", frozenset(self.inject))

    @cached_property
    def calls(self) -> int:
        """expected_generator_calls for every chunk: rank0 decides, the mesh obeys.
        Computed once per Config (frozen): guards read it at every step."""
        return expected_generator_calls(self.regime, self.steps)

    @property
    def targets_one_rank(self) -> bool:
        return bool(self.inject & ONE_RANK_FAULTS)

    @property
    def world(self) -> int:
        return self.mesh + 1

    def with_(self, **kw) -> "Config":
        return replace(self, **kw)

    def describe(self) -> str:
        parts = [f"mesh={self.mesh}", f"depth={self.d_in}/{self.d_out}",
                 f"chunks={self.chunks}", f"hard_cuts={self.hard_cut}",
                 f"faults={self.faults}", f"p2p={self.p2p}", f"regime={self.regime}",
                 f"steps={self.steps}"]
        if (self.leader_in, self.leader_out) != (1, 1):
            parts.append(f"leader_q={self.leader_in}/{self.leader_out}")
        if self.noops:
            parts.append(f"noops={self.noops}")
        if self.inject:
            parts.append("inject=" + ",".join(sorted(self.inject)))
        if not self.watchdog:
            parts.append("watchdog=off")
        if self.cond_flag_all:
            parts.append("cond_flag_all=on")
        if self.mutation:
            parts.append(f"mutation={self.mutation}")
        return " ".join(parts)


_INTS = ("mesh", "d_in", "d_out", "leader_in", "leader_out", "chunks", "hard_cut",
         "faults", "eager", "steps", "noops")


def config_to_dict(cfg: Config) -> dict:
    d = asdict(cfg)
    d["inject"] = sorted(cfg.inject)
    return d


def config_from_dict(d: dict) -> Config:
    d = dict(d)
    unknown = sorted(set(map(str, d)) - {f.name for f in fields(Config)})
    if unknown:
        raise ValueError(f"unknown field {unknown[0][:40]!r}; a Config has "
                         f"{', '.join(f.name for f in fields(Config))}")
    d["inject"] = frozenset(d.get("inject", ()))
    return Config(**d)
