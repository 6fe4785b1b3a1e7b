"""GPU correctness: the CUDA float32 path against the official fixture numbers (TF32 off).

    COM4D_PARITY_DIR=... python bench/gpu_check.py

Runs the DiT grid cases and the whole pipeline_tiny sampling on CUDA in float32 and prints the
max abs errors against the fixtures (the README allows ~1e-5 per forward on a GPU; latents 1e-4).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from parity_utils import load_case, parity_dir  # noqa: E402

from com4d.dit import COM4DTransformer  # noqa: E402
from com4d.inputs import load_inputs  # noqa: E402
from com4d.pipeline import COM4DPipeline, ReconstructionParams  # noqa: E402

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
dev = torch.device("cuda")
report = {}
model = COM4DTransformer.from_pretrained(parity_dir() / "weights" / "COM4D" / "transformer", device=dev)
side, t = load_case("com4d_matrix")
t = {k: v.to(dev) for k, v in t.items()}
S = side["params"]["static_count"]
for mode in ("mix", "cutoff"):
    out = model.forward_grid(t["hidden_states_matrix"], t["timestep"], t["encoder_hidden_states_matrix_temporal"],
                             t[f"encoder_hidden_states_matrix_spatial_{mode}"], S, mode == "cutoff")
    report[f"com4d_matrix_{mode}"] = (out - t[f"output_cond_{mode}"]).abs().max().item()
side, t = load_case("pipeline_tiny")
e, c = side["params"]["infer_json_entry"], side["params"]["cli"]
params = ReconstructionParams(
    num_tokens=e["num_tokens"], stage_a_frame=e["first_frame_idx"], frame_start=e["frames_start_idx"],
    frame_end=e["frames_end_idx"], frame_stride=e["frame_stride"], scene_num_parts=e["scene_num_parts"],
    dynamic_ar_block_size=e["dynamic_ar_block_size"], dynamic_max_memory_frames=e["dynamic_max_memory_frames"],
    dynamic_mix_cutoff=e["dynamic_mix_cutoff"], scene_steps=50, dynamic_steps=c["dynamic_steps"],
)
pipe = COM4DPipeline.from_pretrained(parity_dir() / "weights", device="cuda", dtype="float32")
noise = {"stage_a_static": t["noise_0_stageA_static"], "stage_a_dynamic": t["noise_1_stageA_dynamic"],
         "stage_b_dynamic": t["noise_2_stageB_dynamic"]}
lat = pipe.sample(load_inputs(parity_dir() / "cases" / "pipeline_tiny_inputs"), params, noise=noise)
report["pipeline_static"] = (lat.static.cpu() - t["stageA_static_latents"]).abs().max().item()
report["pipeline_stageB"] = (lat.dynamic.cpu() - t["stageB_dynamic_latents"]).abs().max().item()
report["device"] = torch.cuda.get_device_name()
print(json.dumps(report, indent=1))
