"""The reference workload: a tensor-parallel causal DiT with a KV cache, R0a/R0 recompute
and a convolutional decoder. The example docs/plugin.md walks through.

Shaped like the field's pipeline (a Wan2.1-class causal DiT: chunks of latent frames,
block-causal attention over a KV cache, cross-attention to the prompt, VAE decode on
rank0, recompute from a decoded anchor in R0a), at a size that runs on 2 CPU cores:

* **Phase A (rank0)** `build`: per chunk, seeded noise latents `[1, F, C, h, w]` (bf16),
  the prompt embedding of the epoch (a hard cut is a prompt change), the denoise schedule,
  and the plan bits rank0 decides: `current_start_frame` (frames since the epoch began),
  `reset_kv_cache` / `reset_crossattn_cache` (set with `init_cache`), `do_kv_recompute`
  and, in R0a, `context_frames`: the previous chunk's *decoded* frames re-encoded by a
  small strided conv (the VAE-encoder analogue).
* **Phase B (every mesh rank)** `generator_call`: `blocks` pre-norm transformer blocks,
  Megatron-style tensor parallel: QKV (self and cross) and FFN-in are column-parallel (this
  rank's heads / FFN columns), attention-out and FFN-out are row-parallel and their partial
  sums go through the `all_reduce` the interpreter hands in (bound to mesh_pg and checked
  against the table before the backend is called): three all_reduces per block per call.
  Heads are split evenly across the mesh (12 heads: mesh 1, 2, 3, 4 and 6 are valid).
  Every rank keeps its heads' slice of the KV cache (`cache_chunks` chunks of frames,
  rotary positions on the frame index, oldest positions evicted) and of the
  cross-attention cache. Call 0 of a chunk with `do_kv_recompute` is the recompute pass:
  it re-runs the anchor frames (R0a: `context_frames`; R0, `latent_anchor`: the latents
  this mesh produced for the previous chunk) at positions `[csf - F, csf)` and overwrites
  their cache entries; the remaining calls denoise the chunk, the last of them writes its
  own entries at `[csf, csf + F)`.
* **Phase C (rank0)** `decode`: conv -> SiLU -> 2x upsample -> conv -> tanh, to pixels
  `[F, 3, 2h, 2w]`, kept for the next R0a anchor; the emitted output is a JSON record of
  the latents and pixels (values and exact digests) for the equivalence check.

The mesh never infers a plan bit: it reads each one it needs through `need()`, which
raises `PlanBitError` naming the field, and cross-checks the call count against the
schedule and the recompute bit. Weights come from one seeded generator, identical on every
rank; each rank slices its shard, so a mesh of N computes the same function as a mesh of 1
up to the summation order of the all_reduces (lockstep/equivalence.py measures how much).

State records (`dit_rank{R}.jsonl` in the run directory, or a list in memory): rank0 logs
the anchor it sent, every mesh rank logs, at the end of each chunk, the start frame it
used, its cache positions and a per-head summary of its KV cache. They are what lets the
equivalence check name the *rank* whose state drifted, not only the chunk.

Drift switches (`opts["drift"] = {"name", "rank", "at_chunk"}`) make the state wrong while
the control plane stays clean: `skip_kv_reset` (a mesh rank keeps its KV cache across the
hard cut), `stale_start_frame` (a mesh rank uses the previous chunk's start frame),
`wrong_anchor` (rank0 re-encodes the R0a anchor from chunk k-2 instead of k-1).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F

from lockstep.model import contract as C
from lockstep.model.runopts import DRIFTS   # the names travel in RunOptions

from .trace import encode_line
from .workload import StageCosts, Workload, spend, tensor_digest_i64


@dataclass(frozen=True)
class DiTSpec:
    dim: int = 48
    heads: int = 12
    blocks: int = 2
    ffn: int = 96
    text_dim: int = 32
    text_len: int = 4
    channels: int = 4        # latent channels
    frames: int = 3          # latent frames per chunk
    lat_h: int = 4
    lat_w: int = 4
    cache_chunks: int = 2    # KV cache capacity, in chunks
    seed: int = 0

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def frame_tokens(self) -> int:
        return self.lat_h * self.lat_w

    def heads_of(self, mesh_rank: int, mesh_size: int) -> tuple:
        per = self.heads // mesh_size
        return mesh_rank * per, (mesh_rank + 1) * per

    def check_mesh(self, mesh_size: int) -> None:
        for what, n in (("heads", self.heads), ("ffn", self.ffn)):
            if n % mesh_size:
                raise ValueError(f"DiT {what}={n} is not divisible by mesh {mesh_size}: "
                                 f"tensor parallelism needs an even split")
        if self.dim % self.heads or self.head_dim % 2:
            raise ValueError(f"dim {self.dim} must be heads x an even head_dim")


class PlanBitError(ValueError):
    """A mesh rank needed a plan bit the envelope does not carry (or carries
    inconsistently). The mesh never infers one: it stops, naming the field."""


def need(env: dict, name: str, where: str):
    if name not in env:
        raise PlanBitError(f"{where}: envelope field {name!r} is missing; the mesh never "
                           f"infers a plan bit, rank0 must send it")
    return env[name]


def _weights(spec: DiTSpec) -> dict:
    """Every weight, full size, from one seeded generator in a fixed order (float32 on
    CPU so every rank and the reference draw the same bits)."""
    g = torch.Generator().manual_seed(spec.seed)

    def w(*shape, fan_in=None):
        return torch.randn(*shape, generator=g) / math.sqrt(fan_in or shape[0])

    d, f, c, t = spec.dim, spec.ffn, spec.channels, spec.text_dim
    out = {"patch_in": w(c, d), "t_in": w(32, d), "head_out": w(d, c) * 0.5,
           "dec1": w(8, c, 3, 3, fan_in=c * 9), "dec2": w(3, 8, 3, 3, fan_in=72),
           "enc": w(c, 3, 2, 2, fan_in=12)}
    for b in range(spec.blocks):
        out.update({f"{b}.{n}": w(d, d) for n in ("wq", "wk", "wv", "wo", "cq", "co")})
        out.update({f"{b}.ck": w(t, d), f"{b}.cv": w(t, d), f"{b}.w1": w(d, f),
                    f"{b}.w2": w(f, d)})
    return out


def _rope(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on the frame index: x [heads, T, hd], pos [T]."""
    hd = x.shape[-1]
    freq = 1.0 / (100.0 ** (torch.arange(0, hd, 2, dtype=torch.float32, device=x.device) / hd))
    ang = pos.to(torch.float32)[:, None] * freq[None, :]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


def _time_embed(t: float, device, dtype) -> torch.Tensor:
    freqs = 100.0 * torch.exp(-math.log(100.0) * torch.arange(16, dtype=torch.float32,
                                                              device=device) / 16)
    ang = (t / 1000.0) * freqs
    return torch.cat((ang.sin(), ang.cos())).to(dtype)


class DiTWorkload(Workload):
    def __init__(self, *, rank: int = 0, mesh_size: int = 1, spec: DiTSpec = DiTSpec(),
                 costs: StageCosts = StageCosts(), device="cpu", dtype=torch.float32,
                 drift: dict | None = None, record=None):
        """`rank` is the global rank (0 = rank0, 1.. = mesh); `record` is a callable
        taking one dict, a directory (dit_rank{R}.jsonl), or None."""
        spec.check_mesh(mesh_size)
        self.spec, self.rank, self.mesh_size, self.costs = spec, rank, mesh_size, costs
        self.device, self.dtype = torch.device(device), dtype
        self.drift = dict(drift or {})
        if self.drift and self.drift.get("name") not in DRIFTS:
            raise ValueError(f"unknown drift {self.drift.get('name')!r}; known: {DRIFTS}")
        self.record = _recorder(record, rank)
        full = _weights(spec)
        mesh_rank = max(rank - 1, 0)
        self.h0, self.h1 = spec.heads_of(mesh_rank, mesh_size)
        hd = spec.head_dim
        cols = slice(self.h0 * hd, self.h1 * hd)
        per_f = spec.ffn // mesh_size
        fcols = slice(mesh_rank * per_f, (mesh_rank + 1) * per_f)
        shard = {}
        for name, t in full.items():
            kind = name.split(".")[-1]
            if kind in ("wq", "wk", "wv", "cq", "ck", "cv"):
                t = t[:, cols]                       # column-parallel: this rank's heads
            elif kind in ("wo", "co"):
                t = t[cols, :]                       # row-parallel: partial sums
            elif kind == "w1":
                t = t[:, fcols]
            elif kind == "w2":
                t = t[fcols, :]
            shard[name] = t.contiguous().to(self.device, self.dtype)
        self.w = shard
        # mesh state
        self.kv = None            # per block: {frame position: (k [hl, tok, hd], v)}
        self.cross = None         # per block: (k [hl, L, hd], v)
        self.prev_latents = None  # R0 anchor: what this mesh produced for the last chunk
        self.lat = None
        self.csf_used = None
        self.last_csf = None
        # rank0 state
        self.epoch_start = 0
        self.decoded = {}         # chunk -> pixels of this epoch (R0a anchors)

    # ------------------------------------------------------------------ Phase A (rank0)
    def build(self, chunk_index, cache_epoch, init_cache, regime, steps):
        spend(self.costs.phase_a_ms, self.costs.sleep)
        s = self.spec
        if init_cache:
            self.epoch_start, self.decoded = chunk_index, {}
        csf = (chunk_index - self.epoch_start) * s.frames
        seed = 1_000_003 * cache_epoch + chunk_index
        g = torch.Generator().manual_seed(seed)
        latents = torch.randn(1, s.frames, s.channels, s.lat_h, s.lat_w, generator=g)
        cond = torch.randn(1, s.text_len, s.text_dim,
                           generator=torch.Generator().manual_seed(7919 * cache_epoch + 1))
        sched = [int(round(1000 * (1 - j / steps))) for j in range(steps)]
        tensors = {"conditioning_embeds": cond.to(torch.bfloat16),
                   "latents_in": latents.to(torch.bfloat16),
                   "current_denoising_step_list": torch.tensor(sched, dtype=torch.int64)}
        anchor = None
        plan = C.plan_bits(regime)       # rank0's contract decides, not the workload
        if plan["do_kv_recompute"] and not plan["latent_anchor"]:   # R0a: decoded anchor
            anchor = self._anchor(chunk_index)
            tensors["context_frames"] = anchor
        meta = {"height": 2 * s.lat_h, "width": 2 * s.lat_w, "current_start_frame": csf,
                "reset_kv_cache": bool(init_cache), "reset_crossattn_cache": bool(init_cache),
                "base_seed": seed}
        if self.record is not None:     # built only when kept: _flat copies to the host
            self.record({"rank": 0, "chunk": chunk_index, "epoch": cache_epoch, "csf": csf,
                         "anchor": None if anchor is None else _flat(anchor)})
        return meta, tensors

    def _anchor(self, chunk: int) -> torch.Tensor:
        """R0a: re-encode the previous chunk's decoded frames (none yet at the first chunk
        of an epoch: a blank anchor, at positions < 0 that the mesh never writes)."""
        s = self.spec
        src = chunk - 1
        if self._drifts("wrong_anchor", chunk) and (chunk - 2) in self.decoded:
            src = chunk - 2
        if chunk == self.epoch_start:
            return torch.zeros(1, s.frames, s.channels, s.lat_h, s.lat_w, dtype=torch.bfloat16)
        if src not in self.decoded:
            raise RuntimeError(f"R0a anchor for chunk {chunk} needs decoded chunk {src}, "
                               f"which rank0 has not decoded")
        px = self.decoded[src].to(self.device, self.dtype)
        lat = F.conv2d(px, self.w["enc"], stride=2)
        return lat.unsqueeze(0).to(torch.bfloat16).cpu()

    # ------------------------------------------------------------------ Phase B (mesh)
    def generator_call(self, call_index, envelope, tensors, all_reduce):
        spend(self.costs.phase_b_ms, self.costs.sleep)
        where = f"mesh rank {self.rank} chunk {envelope.get('chunk_index')}"
        n = need(envelope, "expected_generator_calls", where)
        recompute = need(envelope, "do_kv_recompute", where)
        sched = tensors["current_denoising_step_list"].tolist()
        if n != len(sched) + int(recompute):
            raise PlanBitError(f"{where}: expected_generator_calls={n} but the schedule has "
                               f"{len(sched)} steps and do_kv_recompute={recompute}")
        if not 0 <= call_index < n:
            raise PlanBitError(f"{where}: generator call {call_index} outside "
                               f"expected_generator_calls={n}")
        chunk = envelope["chunk_index"]
        if call_index == 0:
            self._begin_chunk(envelope, tensors, where)
        csf = self.csf_used
        if recompute and call_index == 0:
            self._recompute(envelope, tensors, csf, all_reduce, where)
        else:
            j = call_index - int(recompute)
            if j == 0:
                self.lat = tensors["latents_in"].to(self.device, self.dtype)[0]
            self.lat = self._denoise(self.lat, sched[j], len(sched) - j, csf,
                                     write=j == len(sched) - 1, all_reduce=all_reduce,
                                     bias=float(need(envelope, "kv_cache_attention_bias",
                                                     where)))
        if call_index == n - 1:
            self.prev_latents = self.lat
            self.last_csf = need(envelope, "current_start_frame", where)
            if self.record is not None:     # a device sync per chunk: only when kept
                self.record(self.state_record(chunk, envelope["cache_epoch"], self.h0,
                                              self.h1))

    def _drifts(self, name: str, chunk: int) -> bool:
        d = self.drift
        return d.get("name") == name and d.get("rank") == self.rank and \
            d.get("at_chunk", chunk) == chunk

    def _begin_chunk(self, env, tensors, where):
        s = self.spec
        chunk = env["chunk_index"]
        init = need(env, "init_cache", where)
        reset_kv = init or need(env, "reset_kv_cache", where)
        reset_x = init or need(env, "reset_crossattn_cache", where)
        if self.kv is None and not reset_kv:
            raise PlanBitError(f"{where}: no KV cache yet and neither init_cache nor "
                               f"reset_kv_cache is set")
        if reset_kv and not self._drifts("skip_kv_reset", chunk):
            self.kv = [dict() for _ in range(s.blocks)]
            self.prev_latents = None
        if init:
            self.last_csf = None
        if reset_x:
            ctx = tensors["conditioning_embeds"].to(self.device, self.dtype)[0]
            self.cross = [(self._heads(ctx @ self.w[f"{b}.ck"]),
                           self._heads(ctx @ self.w[f"{b}.cv"])) for b in range(s.blocks)]
        elif self.cross is None:
            raise PlanBitError(f"{where}: no cross-attention cache and "
                               f"reset_crossattn_cache is not set")
        csf = need(env, "current_start_frame", where)
        if self._drifts("stale_start_frame", chunk) and self.last_csf is not None:
            csf = self.last_csf
        self.csf_used = csf

    def _recompute(self, env, tensors, csf, all_reduce, where):
        """The recompute pass: the anchor frames at [csf - F, csf) overwrite their cache
        entries (positions < 0 are computed, for the collectives, but never written)."""
        if need(env, "latent_anchor", where):
            anchor = self.prev_latents
            if anchor is None:
                anchor = torch.zeros(self.spec.frames, self.spec.channels, self.spec.lat_h,
                                     self.spec.lat_w, device=self.device, dtype=self.dtype)
        else:
            if "context_frames" not in tensors:
                raise PlanBitError(f"{where}: do_kv_recompute without latent_anchor needs "
                                   f"'context_frames'; the mesh never decodes pixels itself")
            anchor = tensors["context_frames"].to(self.device, self.dtype)[0]
        self._forward(anchor, 0.0, csf - self.spec.frames, write=True, all_reduce=all_reduce,
                      bias=float(need(env, "kv_cache_attention_bias", where)), head=False)

    def _denoise(self, lat, t, remaining, csf, *, write, all_reduce, bias):
        pred = self._forward(lat, float(t), csf, write=write, all_reduce=all_reduce,
                             bias=bias, head=True)
        return lat + (pred - lat) / remaining

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """[T, hl*hd] -> [hl, T, hd]"""
        return x.view(x.shape[0], -1, self.spec.head_dim).transpose(0, 1)

    def _forward(self, lat, t, pos0, *, write, all_reduce, bias, head):
        s, w = self.spec, self.w
        fr, tok = s.frames, s.frame_tokens
        x = lat.permute(0, 2, 3, 1).reshape(fr * tok, s.channels) @ w["patch_in"]
        x = x + _time_embed(t, self.device, self.dtype) @ w["t_in"]
        pos = torch.arange(pos0, pos0 + fr, device=self.device).repeat_interleave(tok)
        log_bias = math.log(bias) if bias > 0 else -1e4
        for b in range(s.blocks):
            h = F.layer_norm(x, (s.dim,))
            q = _rope(self._heads(h @ w[f"{b}.wq"]), pos)
            k = _rope(self._heads(h @ w[f"{b}.wk"]), pos)
            v = self._heads(h @ w[f"{b}.wv"])
            cache = self.kv[b]
            old = sorted(p for p in cache if not pos0 <= p < pos0 + fr)
            if old:
                kc = torch.cat([cache[p][0] for p in old], dim=1)
                vc = torch.cat([cache[p][1] for p in old], dim=1)
                keys, vals = torch.cat((kc, k), dim=1), torch.cat((vc, v), dim=1)
            else:
                keys, vals = k, v
            sc = (q @ keys.transpose(1, 2)) / math.sqrt(s.head_dim)
            if old:
                sc[..., :kc.shape[1]] += log_bias
            a = (sc.softmax(-1) @ vals).transpose(0, 1).reshape(fr * tok, -1)
            x = x + self._reduced(a @ w[f"{b}.wo"], all_reduce)
            if write:
                for i in range(fr):
                    if pos0 + i >= 0:
                        sl = slice(i * tok, (i + 1) * tok)
                        cache[pos0 + i] = (k[:, sl].clone(), v[:, sl].clone())
                for p in sorted(cache)[:-s.cache_chunks * fr]:
                    del cache[p]
            h = F.layer_norm(x, (s.dim,))
            ck, cv = self.cross[b]
            cq = self._heads(h @ w[f"{b}.cq"])
            a = ((cq @ ck.transpose(1, 2)) / math.sqrt(s.head_dim)).softmax(-1) @ cv
            x = x + self._reduced(a.transpose(0, 1).reshape(fr * tok, -1) @ w[f"{b}.co"],
                                  all_reduce)
            h = F.layer_norm(x, (s.dim,))
            x = x + self._reduced(F.gelu(h @ w[f"{b}.w1"]) @ w[f"{b}.w2"], all_reduce)
        if not head:
            return None
        out = F.layer_norm(x, (s.dim,)) @ w["head_out"]
        return out.reshape(fr, s.lat_h, s.lat_w, s.channels).permute(0, 3, 1, 2)

    @staticmethod
    def _reduced(partial, all_reduce):
        partial = partial.contiguous()
        all_reduce(partial)
        return partial

    def state_record(self, chunk, epoch, h0, h1) -> dict:
        """What this rank's state looks like at the end of a chunk, for heads [h0, h1):
        the start frame used, the cache positions, per block the K and V cache means per
        head ([blocks][2][heads][head_dim]). The reference (all heads) slices it."""
        lo, hi = h0 - self.h0, h1 - self.h0
        means = {}          # block -> [K, V] means on the device: one copy to the host
        for b, cache in enumerate(self.kv):
            ps = sorted(cache)
            if ps:
                means[b] = torch.stack([
                    torch.cat([cache[p][i] for p in ps], dim=1)[lo:hi].float().mean(1)
                    for i in (0, 1)])
        host = dict(zip(means, torch.stack(list(means.values())).cpu().tolist())) \
            if means else {}
        kv = [host.get(b, [[], []]) for b in range(len(self.kv))]
        return {"rank": self.rank, "chunk": chunk, "epoch": epoch, "csf": self.csf_used,
                "heads": [h0, h1], "kv_pos": sorted(self.kv[0]), "kv": kv}

    def result(self, envelope, tensors):
        return {"latents_out": self.lat.unsqueeze(0).to(torch.bfloat16).contiguous()}

    def result_meta(self, envelope, out):
        """The leader reports the start frame it actually used and the exact digest."""
        return dict(super().result_meta(envelope, out), mesh_current_start_frame=self.csf_used)

    # ------------------------------------------------------------------ Phase C (rank0)
    def decode(self, result_meta, tensors):
        spend(self.costs.phase_c_ms, self.costs.sleep)
        lat_bf = tensors["latents_out"]
        lat = lat_bf.to(self.device, self.dtype)[0]
        h = F.silu(F.conv2d(lat, self.w["dec1"], padding=1))
        h = F.interpolate(h, scale_factor=2, mode="nearest")
        px = torch.tanh(F.conv2d(h, self.w["dec2"], padding=1))
        chunk = result_meta["chunk_index"]
        self.decoded[chunk] = px.detach().cpu()
        # an R0a anchor needs chunk k-1 (k-2 under the wrong_anchor drift): keep no more
        for old in [c for c in self.decoded if c < chunk - 1]:
            del self.decoded[old]
        return {"output_digest_i64": result_meta.get("output_digest_i64"),
                "latents_digest": tensor_digest_i64(lat_bf),
                "pixels_digest": tensor_digest_i64(px.float()),
                "latents": _flat(lat_bf), "pixels": _flat(px)}


def _flat(t: torch.Tensor) -> list:
    return t.detach().float().cpu().flatten().tolist()


def _recorder(record, rank):
    if record is None:
        return None
    if callable(record):
        return record
    path = Path(record) / f"dit_rank{rank}.jsonl"
    f = open(path, "wb", buffering=0)

    def write(rec):     # the trace's encoder: orjson where installed (a record is
        f.write(encode_line(rec))   # tens of thousands of floats at the field's sizes)
    return write


def spec_from_opts(opts) -> DiTSpec:
    """The DiTSpec a run's options size (`RunOptions.dit`); an unknown field is named."""
    known = {f.name for f in fields(DiTSpec)}
    unknown = sorted(set(opts.dit) - known)
    if unknown:
        raise ValueError(f"opts.dit: unknown field(s) {unknown}; known: {sorted(known)}")
    return DiTSpec(**opts.dit)


def spec_dict(spec: DiTSpec) -> dict:
    return asdict(spec)
