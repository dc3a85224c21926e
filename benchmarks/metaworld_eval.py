"""Meta-World closed-loop evaluation: success rate per task, with the model served over openpi's
protocol exactly as a robot would call it. Runs in .venv-metaworld (metaworld + openpi-client):

    .venv/bin/python -m kairos_jax.serve --checkpoint=runs/metaworld --port=8000 &      # the model
    .venv-metaworld/bin/python -m benchmarks.metaworld_eval --policies=server,expert,random \\
        [--host=127.0.0.1 --port=8000] [--tasks=mt10] [--episodes=50] [--seed=1] [--max_steps=500] \\
        [--execute=0] [--videos=2] [--out=runs/metaworld_eval]

Policies:
    server  openpi_client.websocket_client_policy.WebsocketClientPolicy(host, port): each request is
            {"observation/image": uint8 [S, S, 3] (the camera the demonstrations were recorded with),
             "observation/state": float32 [21] (the embodiment's proprio: Meta-World's observation less
             its frame stack), "prompt": the task text,
             "embodiment": "metaworld"}; the answer's action chunk [k, 4] is applied for --execute
            steps (0: all k) before the next request. Each episode starts with {"reset": true}.
    expert  Meta-World's scripted policy for the task (metaworld.policies.ENV_POLICY_MAP).
    random  uniform actions in [-1, 1]^4 (from the episode's seed).

Episode i of a task starts from the scene of episode_seed(--seed, task, i) (the recorder's seeds;
the default --seed=1 differs from the recorder's default 0, so no evaluated scene was recorded) and
counts as a success if Meta-World's info["success"] is true after any step within --max_steps
(Meta-World's horizon, 500); it stops at the first success.

Writes OUT/results.json ({"settings", "results": {policy: {"tasks": {task: {"episodes", "successes",
"success_rate", "mean_steps_to_success"}}, "mean_success_rate"}}}), OUT/results.md (a table: a row a
task, a column a policy, and the mean), both rewritten after every task (settings.complete: false
until the last; the mean is over the tasks done) and OUT/videos/<policy>_<task>_<i>.mp4 for the first
--videos episodes of each task. --trace also saves, per server episode, the frames and states sent
and the chunks received as OUT/trace/<task>_<i>.npz. Exit status 2: a user mistake or a server that
cannot be reached or answers with an error (one line `error: ...`).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time

import numpy as np

from data_pipelines.sim.metaworld_record import (
    ACTION_DIM,
    CAMERAS,
    EMBODIMENT,
    FPS,
    MetaWorldError,
    MetaWorldTask,
    episode_seed,
    parse_tasks,
    proprio_of,
)

POLICIES = ("server", "expert", "random")


class EvalError(RuntimeError):
    """A server that cannot be used (unreachable, no metaworld embodiment, an error answer)."""


class ServerPolicy:
    """The served model through the real openpi client; one connection, one episode at a time."""

    def __init__(self, host: str, port: int, execute: int, timeout_s: float = 10.0):
        try:       # the openpi client retries a refused connection forever: check it answers first
            socket.create_connection((host, port), timeout=timeout_s).close()
        except OSError as e:
            raise EvalError(f"no server at ws://{host}:{port} ({e.strerror or e}); start one with "
                            f"`.venv/bin/python -m kairos_jax.serve --checkpoint=DIR --port={port}`") from None
        from openpi_client.websocket_client_policy import WebsocketClientPolicy

        self.client = WebsocketClientPolicy(host, port)
        self.metadata = self.client.get_server_metadata()
        served = self.metadata.get("embodiments", {})
        if EMBODIMENT not in served:
            raise EvalError(f"the server at ws://{host}:{port} does not serve embodiment {EMBODIMENT!r} (it serves "
                            f"{sorted(served)}): serve a model trained on Meta-World data")
        if self.metadata.get("mode", "policy") != "policy":
            raise EvalError(f"the server runs mode {self.metadata.get('mode')!r}; start it with --mode=policy")
        self.k = int(self.metadata["action_horizon"])
        self.execute = self.k if execute <= 0 else min(execute, self.k)

    def infer(self, request: dict) -> dict:
        try:
            return self.client.infer(request)
        except RuntimeError as e:
            raise EvalError(str(e).replace("\n", " ")) from None

    def reset(self) -> None:
        self.infer({"reset": True})

    def chunk(self, frame: np.ndarray, state: np.ndarray, prompt: str) -> np.ndarray:
        answer = self.infer({"observation/image": frame, "observation/state": proprio_of(state),
                             "prompt": prompt, "embodiment": EMBODIMENT})
        actions = np.asarray(answer.get("actions"))
        if actions.shape != (self.k, ACTION_DIM) or not np.all(np.isfinite(actions)):
            raise EvalError(f"the server answered actions of shape {actions.shape} (finite: "
                            f"{bool(np.all(np.isfinite(actions)))}); expected a finite [{self.k}, {ACTION_DIM}]")
        return actions


def run_episode(mw: MetaWorldTask, policy: str, seed: int, *, max_steps: int, server: ServerPolicy | None = None,
                video: bool = False, trace: bool = False) -> dict:
    """One episode; {"success", "steps", "first_success", "frames" (video only), "trace" (server, trace)}."""
    obs = mw.reset(seed)
    expert = mw.expert() if policy == "expert" else None
    rng = np.random.default_rng(seed)
    frames, sent, states, chunks = [], [], [], []
    steps, first = 0, None
    if server is not None:
        server.reset()
    while steps < max_steps and first is None:
        if policy == "server":
            frame = mw.frame()
            chunk = server.chunk(frame, obs, mw.text)
            if trace:
                sent.append(frame)
                states.append(proprio_of(obs))
                chunks.append(chunk)
            plan = chunk[:server.execute]
        elif policy == "expert":
            plan = [expert.get_action(obs)]
        else:
            plan = [rng.uniform(-1.0, 1.0, ACTION_DIM)]
        for a in plan:
            if video:
                frames.append(mw.frame())
            obs, _, ok = mw.step(a)
            steps += 1
            if ok:
                first = steps
                break
            if steps >= max_steps:
                break
    if video:
        frames.append(mw.frame())
    out = {"success": first is not None, "steps": steps, "first_success": first}
    if video:
        out["frames"] = np.stack(frames)
    if trace and policy == "server":
        out["trace"] = {"frames": np.stack(sent), "states": np.stack(states), "actions": np.stack(chunks)}
    return out


def evaluate(policies, tasks, *, episodes: int, seed: int, max_steps: int, out: str, image_size: int = 64,
             camera: str = "workspace", videos: int = 2, host: str = "127.0.0.1", port: int = 8000,
             execute: int = 0, trace: bool = False, log=print) -> dict:
    from data_pipelines.video import encode

    server = ServerPolicy(host, port, execute) if "server" in policies else None
    results = {p: {"tasks": {}} for p in policies}
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    for n, task in enumerate(tasks):
        with MetaWorldTask(task, image_size, camera) as mw:
            horizon = min(max_steps, mw.max_steps)
            for policy in policies:
                ok, to_success = 0, []
                t_task = time.time()
                for i in range(episodes):
                    ep = run_episode(mw, policy, episode_seed(seed, task, i), max_steps=horizon, server=server,
                                     video=i < videos, trace=trace)
                    ok += ep["success"]
                    if ep["success"]:
                        to_success.append(ep["first_success"])
                    if i < videos:
                        path = os.path.join(out, "videos", f"{policy}_{task}_{i}.mp4")
                        os.makedirs(os.path.dirname(path), exist_ok=True)
                        encode(path, ep["frames"], FPS)
                    if "trace" in ep:
                        os.makedirs(os.path.join(out, "trace"), exist_ok=True)
                        np.savez(os.path.join(out, "trace", f"{task}_{i}.npz"), seed=episode_seed(seed, task, i),
                                 **ep["trace"])
                results[policy]["tasks"][task] = {
                    "episodes": episodes, "successes": ok, "success_rate": ok / episodes,
                    "mean_steps_to_success": float(np.mean(to_success)) if to_success else None,
                    "seconds": round(time.time() - t_task, 1)}
                log(f"{task:<26} {policy:<7} success {ok}/{episodes}")
        done = list(tasks[:n + 1])
        report = _report(results, done, tasks, episodes, seed, max_steps, image_size, camera, policies, t0, server,
                         host, port)
        for name, text in (("results.json", json.dumps(report, indent=1)), ("results.md", markdown_table(report))):
            with open(os.path.join(out, name + ".tmp"), "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(os.path.join(out, name + ".tmp"), os.path.join(out, name))   # after every task
    return report


def _report(results, done, tasks, episodes, seed, max_steps, image_size, camera, policies, t0, server, host,
            port) -> dict:
    for policy in policies:
        rates = [results[policy]["tasks"][t]["success_rate"] for t in done]
        results[policy]["mean_success_rate"] = float(np.mean(rates))
    settings = {"tasks": done, "tasks_asked": list(tasks), "complete": len(done) == len(tasks), "episodes": episodes,
                "seed": seed, "max_steps": max_steps, "image_size": image_size, "camera": camera,
                "policies": list(policies), "seconds": round(time.time() - t0, 1)}
    if server is not None:
        settings["server"] = {"uri": f"ws://{host}:{port}", "model": server.metadata.get("model"),
                              "checkpoint": server.metadata.get("checkpoint"), "step": server.metadata.get("step"),
                              "action_horizon": server.k, "execute": server.execute}
    return {"settings": settings, "results": results}


def markdown_table(report: dict) -> str:
    policies = report["settings"]["policies"]
    n = report["settings"]["episodes"]
    lines = [f"| task ({n} episodes each) | " + " | ".join(policies) + " |",
             "|---|" + "---:|" * len(policies)]
    for task in report["settings"]["tasks"]:
        lines.append(f"| {task} | " + " | ".join(
            f"{report['results'][p]['tasks'][task]['success_rate']:.0%}" for p in policies) + " |")
    lines.append("| **mean** | " + " | ".join(
        f"**{report['results'][p]['mean_success_rate']:.1%}**" for p in policies) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.metaworld_eval", description=__doc__.split("\n")[0])
    p.add_argument("--policies", default="server,expert,random", help=f"comma-separated, of {list(POLICIES)}")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--tasks", default="mt10", help="mt10 (default), mt50 or comma-separated task names")
    p.add_argument("--episodes", type=int, default=50, help="episodes per task and policy")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--max_steps", type=int, default=500)
    p.add_argument("--image_size", type=int, default=64, help="camera frames sent to the server")
    p.add_argument("--camera", default="workspace", choices=CAMERAS)
    p.add_argument("--execute", type=int, default=0, help="actions of each chunk applied (0: all)")
    p.add_argument("--videos", type=int, default=2, help="episodes per task and policy saved as mp4")
    p.add_argument("--trace", action="store_true", help="save the server episodes' requests and answers")
    p.add_argument("--out", default="runs/metaworld_eval")
    args = p.parse_args(argv)
    policies = [x.strip() for x in args.policies.split(",") if x.strip()]
    try:
        bad = [x for x in policies if x not in POLICIES]
        if bad or not policies:
            raise MetaWorldError(f"--policies={args.policies}: choose from {list(POLICIES)}")
        for name in ("episodes", "max_steps"):
            if getattr(args, name) < 1:
                raise MetaWorldError(f"--{name}={getattr(args, name)}: must be >= 1")
        if args.videos < 0 or args.execute < 0:
            raise MetaWorldError("--videos and --execute must be >= 0")
        report = evaluate(policies, parse_tasks(args.tasks), episodes=args.episodes, seed=args.seed,
                          max_steps=args.max_steps, out=args.out, image_size=args.image_size, camera=args.camera,
                          videos=args.videos, host=args.host, port=args.port, execute=args.execute,
                          trace=args.trace)
    except (MetaWorldError, EvalError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown_table(report))
    print(f"wrote {os.path.join(args.out, 'results.json')} in {report['settings']['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
