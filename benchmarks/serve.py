"""Serving: latency and throughput of `python -m kairos_jax.serve` against concurrent clients, and its
memory over a long run.

    flock /tmp/kairos_bench.lock python -m benchmarks.serve --out=serve.json [--requests=400] [--soak=10000]

A tiny random model (the tests' size: width 32, 2 layers [swa, gdn], 8x8 frames in 4 patches,
k = 2, two robot embodiments) is exported with training statistics into a temporary folder and
served by `python -m kairos_jax.serve` as a subprocess on a free loopback port, in policy mode.
Clients are asyncio websocket connections in this process speaking the openpi protocol with our
packer (kairos_jax/inference/wire.py, byte-identical to openpi's); each sends 224x224 RGB frames
(the size openpi's examples send; the server crops and resizes them) and waits for every answer
before the next request, one episode per connection.

- Concurrency 1, 4, 16: `--requests` requests in all, split over the clients, after 4 warm-up
  requests per client; per request the round-trip latency seen by the client (p50, p99, mean),
  the server's own "infer_ms" and "queue_ms" (p50), and throughput = requests / wall time.
- Soak: `--soak` requests (default 10,000) by 4 clients; client 0 runs one episode throughout,
  the others reconnect (a new episode) every 500 requests. The server's resident memory (VmRSS of
  its process) is read after every 1,000 requests (--rss_every); "growth_mb" = last - the reading at 1,000.

Both processes share the machine's cores (the client's packing and the server's engine compete),
so the figures are for this machine, not for the model alone. Writes one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_HW = (224, 224)


def write_checkpoint(directory: str) -> dict:
    """An export folder of a tiny random model with reacher and pusher statistics; returns its shape."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from data_pipelines.normalization import EmbodimentStats, NormStats, write_stats
    from experiments import base
    from kairos_jax.model import KairosWorldModel
    from kairos_jax.training import checkpointing

    c = base.get_base_config()
    c.model.update(dict(video_width=32, action_width=16, depth=2, num_heads=2, head_dim=8, text_width=16,
                        text_depth=1, text_heads=2, cond_dim=16, dtype="float32", mlp_ratio=2.0, window=2,
                        dilation=2, gdn_chunk_size=8, pattern=("swa", "gdn"), scan_layers=False))
    c.data.update(dict(image_size=8, patch_size=4, num_blocks=6, action_chunk=2, action_dim=3, proprio_dim=16,
                       text_len=8, num_embodiments=5))
    c.curriculum = ("phase3_robot",)
    abstract = nnx.eval_shape(lambda: KairosWorldModel(c.model, c.data, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    leaves, tree = jax.tree.flatten(state)
    r = np.random.default_rng(0)
    leaves = [jnp.asarray(0.2 * r.standard_normal(x.shape), x.dtype) for x in leaves]
    model = nnx.merge(graphdef, jax.tree.unflatten(tree, leaves))
    checkpointing.export_params(directory, nnx.to_pure_dict(nnx.state(model, nnx.Param)), c.to_json_best_effort())
    for name, a, p in (("reacher", 2, 4), ("pusher", 3, 6)):
        out = os.path.join(directory, "stats", name)
        os.makedirs(out)
        stats = lambda d: NormStats.compute(r.normal(0.0, 1.0, (500, d)))
        write_stats(out, {name: EmbodimentStats(5, 500, stats(a), stats(p))})
    n_params = sum(int(np.prod(x.shape)) for x in leaves)
    return {"params": n_params, "pattern": list(c.model.pattern), "depth": c.model.depth,
            "video_width": c.model.video_width, "frame": [c.data.image_size, c.data.image_size],
            "action_chunk": c.data.action_chunk, "euler_steps": c.rollout.num_steps}


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1)) / 1024


class Client:
    """One connection = one episode; `request()` -> (latency_ms, server_timing)."""

    def __init__(self, uri: str, seed: int, embodiment: str):
        self.uri, self.embodiment = uri, embodiment
        r = np.random.default_rng(seed)
        self.frames = r.integers(0, 256, (8, *IMAGE_HW, 3), dtype=np.uint8)
        self.t, self.ws = 0, None

    async def connect(self):
        from websockets.asyncio.client import connect

        from kairos_jax.inference import wire

        if self.ws is not None:
            await self.ws.close()
        self.ws = await connect(self.uri, compression=None, max_size=None)
        wire.unpackb(await self.ws.recv())

    async def request(self):
        from kairos_jax.inference import wire

        obs = {"observation/image": self.frames[self.t % len(self.frames)], "prompt": "do the task",
               "embodiment": self.embodiment}
        self.t += 1
        t0 = time.perf_counter()
        await self.ws.send(wire.packb(obs))
        answer = await self.ws.recv()
        latency = (time.perf_counter() - t0) * 1000
        if isinstance(answer, str):
            raise RuntimeError(answer)
        return latency, wire.unpackb(answer)["server_timing"]

    async def close(self):
        await self.ws.close()


async def concurrency_run(uri: str, clients: int, requests: int, warmup: int = 4) -> dict:
    cs = [Client(uri, i, ("reacher", "pusher")[i % 2]) for i in range(clients)]
    for c in cs:
        await c.connect()
    per = max(1, requests // clients)

    async def run(c, n, out):
        for _ in range(n):
            out.append(await c.request())

    await asyncio.gather(*(run(c, warmup, []) for c in cs))
    results = [[] for _ in cs]
    t0 = time.perf_counter()
    await asyncio.gather(*(run(c, per, r) for c, r in zip(cs, results)))
    wall = time.perf_counter() - t0
    for c in cs:
        await c.close()
    lat = np.array([x[0] for r in results for x in r])
    infer = np.array([x[1]["infer_ms"] for r in results for x in r])
    queue = np.array([x[1]["queue_ms"] for r in results for x in r])
    return {"clients": clients, "requests": int(lat.size), "p50_ms": round(float(np.percentile(lat, 50)), 2),
            "p99_ms": round(float(np.percentile(lat, 99)), 2), "mean_ms": round(float(lat.mean()), 2),
            "throughput_rps": round(lat.size / wall, 1), "server_infer_p50_ms": round(float(np.median(infer)), 2),
            "server_queue_p50_ms": round(float(np.median(queue)), 2)}


async def soak_run(uri: str, pid: int, total: int, clients: int = 4, episode: int = 500, every: int = 1000) -> dict:
    cs = [Client(uri, 100 + i, ("reacher", "pusher")[i % 2]) for i in range(clients)]
    for c in cs:
        await c.connect()
    done, readings, t0 = 0, [], time.perf_counter()
    lock = asyncio.Lock()

    async def run(i, c):
        nonlocal done
        for j in range(total // clients):
            if i > 0 and j > 0 and j % episode == 0:
                await c.connect()          # a new episode on a new connection
            await c.request()
            async with lock:
                done += 1
                if done % every == 0:
                    readings.append([done, round(rss_mb(pid), 1)])

    await asyncio.gather(*(run(i, c) for i, c in enumerate(cs)))
    for c in cs:
        await c.close()
    rss = [r[1] for r in readings]
    return {"requests": done, "clients": clients, "episode_requests": episode,
            "seconds": round(time.perf_counter() - t0, 1),
            "rss_mb": readings, "growth_mb": round(rss[-1] - rss[0], 1) if rss else None,
            "max_minus_min_mb": round(max(rss) - min(rss), 1) if rss else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="serve.json")
    p.add_argument("--requests", type=int, default=400, help="timed requests per concurrency level")
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--soak", type=int, default=10_000, help="requests of the memory run (0: none)")
    p.add_argument("--rss_every", type=int, default=1000, help="soak requests between two RSS readings")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "export")
        model = write_checkpoint(ckpt)
        proc = subprocess.Popen([sys.executable, "-m", "kairos_jax.serve", f"--checkpoint={ckpt}", "--port=0",
                                 "--exit_after_idle_s=300"], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                                env=dict(os.environ, PYTHONPATH=ROOT))
        try:
            line = proc.stdout.readline()
            m = re.search(r"ws://(\S+):(\d+)", line)
            if not m:
                raise SystemExit(f"the server did not start: {line!r}")
            uri = f"ws://{m.group(1)}:{m.group(2)}"
            rss_start = rss_mb(proc.pid)
            result = {"platform": platform.platform(), "cpus": os.cpu_count(), "model": model,
                      "image": [*IMAGE_HW, 3], "server_rss_after_start_mb": round(rss_start, 1), "concurrency": []}
            for n in (int(x) for x in args.concurrency.split(",")):
                row = asyncio.run(concurrency_run(uri, n, args.requests))
                print(json.dumps(row), flush=True)
                result["concurrency"].append(row)
            if args.soak:
                result["soak"] = asyncio.run(soak_run(uri, proc.pid, args.soak, every=args.rss_every))
                print(json.dumps(result["soak"]), flush=True)
        finally:
            proc.terminate()
            proc.wait(60)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
