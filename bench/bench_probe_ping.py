"""Ping round trips while another client's upload of a 300000-packet mkv is probed (issue 12).

The probe demuxes every packet (seconds); a server that probes on its socket thread answers no
ping meanwhile. Loopback, tiny weights, CPU:

    PYTHONPATH=. python bench/bench_probe_ping.py      # prints one JSON line

bench/results/cpu_probe_ping.json holds a run on the tree before issue 12 (commit 61dc3e2) and one after.
"""

import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import av
import numpy as np

from backend.client import BackendError, Client
from backend.server import Server, ServerConfig
from backend.store import JobStore
from com4d.pipeline import COM4DPipeline

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from parity_utils import parity_dir  # noqa: E402


def video(path, packets=300_000):
    with av.open(str(path), "w") as c:
        s = c.add_stream("ffv1", rate=1000)
        s.width = s.height = 16
        s.pix_fmt = "yuv420p"
        data = bytes(next(iter(s.encode(av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")))))
        for i in range(packets):
            p = av.Packet(data)
            p.pts = p.dts = i
            p.stream = s
            c.mux(p)
    return path


tmp = Path(tempfile.mkdtemp())
data = video(tmp / "many.mkv").read_bytes()
pipe = COM4DPipeline.from_pretrained(str(parity_dir() / "weights"), device="cpu", dtype="float32")
server = Server(pipe, JobStore(tmp / "store"), ServerConfig(bind="tcp://127.0.0.1:*"))
server.start()
lat, done = [], threading.Event()


def pinger():
    with Client(server.address, timeout=60) as c:
        while not done.is_set():
            t = time.monotonic()
            c.ping()
            lat.append(time.monotonic() - t)
            time.sleep(0.02)


th = threading.Thread(target=pinger)
th.start()
time.sleep(0.5)
prompts = {"objects": [{"name": "a", "role": "dynamic", "prompts": [{"frame": 0, "points": [[8, 8, 1]]}]}]}
with Client(server.address, timeout=120) as c:
    t = time.monotonic()
    try:
        c.submit(video=data, video_filename="many.mkv", prompts=prompts, params={"frame_stride": 1})
        code = "accepted"
    except BackendError as e:
        code = e.code
    submit_s = time.monotonic() - t
done.set()
th.join()
server.stop()
print(
    json.dumps(
        {
            "upload_bytes": len(data),
            "submit_reply_s": round(submit_s, 2),
            "reply": code,
            "pings": len(lat),
            "max_ping_s": round(max(lat), 3),
            "median_ping_s": round(sorted(lat)[len(lat) // 2], 4),
        }
    )
)
