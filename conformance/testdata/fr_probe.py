"""One-rank NCCL probe: record a real Flight Recorder dump for conformance/flight.py."""
import json, os, sys
os.environ.setdefault("TORCH_FR_BUFFER_SIZE", "2000")
os.environ.setdefault("TORCH_NCCL_ENABLE_TIMING", "1")
import torch, torch.distributed as dist
from datetime import timedelta
out = os.environ["OUT"]
dist.init_process_group("nccl", init_method="tcp://127.0.0.1:29777", rank=0, world_size=1,
                        timeout=timedelta(seconds=30), device_id=torch.device("cuda", 0))
mesh = dist.new_group([0], timeout=timedelta(seconds=30), group_desc="mesh_pg")
t = torch.zeros(11, dtype=torch.int64, device="cuda")
dist.all_gather([torch.zeros_like(t)], t)               # world_pg parity
dist.broadcast(t, 0, group=mesh)                         # header
dist.broadcast(torch.zeros(600, dtype=torch.uint8, device="cuda"), 0, group=mesh)  # packed payload
dist.all_gather([torch.zeros(1, dtype=torch.int64, device="cuda")], torch.zeros(1, dtype=torch.int64, device="cuda"), group=mesh)
x = torch.ones(4, 64, device="cuda")
dist.all_reduce(x, group=mesh); dist.all_reduce(x, group=mesh)
torch.cuda.synchronize()
raw = torch._C._distributed_c10d._dump_nccl_trace_json(includeCollectives=True, onlyActive=False)
open(os.path.join(out, "fr_rank0.json"), "wb").write(raw if isinstance(raw, bytes) else raw.encode())
d = json.loads(raw)
print("version", d.get("version"), "entries", len(d.get("entries", [])))
for e in d.get("entries", []):
    print(e.get("process_group"), e.get("collective_seq_id"), e.get("p2p_seq_id"), e.get("profiling_name"), e.get("state"), e.get("is_p2p"))
print(torch.__version__, torch.cuda.nccl.version())
dist.destroy_process_group()
