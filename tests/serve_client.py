"""Client side of tests/test_serve.py, run inside .venv-openpi (the real openpi-client, numpy < 2):

    .venv-openpi/bin/python tests/serve_client.py SPEC.json OUT.json

It imports nothing from this repository. SPEC.json:

    {"host": "127.0.0.1", "port": 8000, "arrays": "in.npz",
     "steps": [...], "load": {...}, "pack": true}

- "steps": run in order; each {"client": name, ...} talks through that name's
  `WebsocketClientPolicy` (created on first use, and again after the server closed it):
    {"client": c, "request": {...}}   infer(request); string values "@key" are arrays of in.npz
    {"client": c, "raw": "@key"}      the npz array's bytes sent as one binary message
    {"client": c, "text": "..."}      a text frame
    {"client": c, "close": true}      close that client's connection
    {"vanish": {...request}}          a plain websocket connection sends the request and closes
                                      without reading the answer
  Each step's result: {"answer": {...}} (arrays saved into OUT.npz as "<step>/<key>", listed by
  key), {"error": "<RuntimeError text>"}, or {"closed": "<ConnectionClosed text>"}.
- "load": {"clients": n, "requests": m, "episodes": [[request, ...], ...]}: n threads, each its own
  client running episode i % len(episodes) (m requests, cycling); per client the actions
  ("load/<i>/<j>") and per-request latencies.
- "pack": openpi's msgpack_numpy.packb of a fixed object, hex (compared with our packer).

OUT.json: {"metadata": {client: metadata}, "steps": [...], "load": {...}, "pack": hex}.
"""

import json
import sys
import threading
import time

import numpy as np
import websockets.sync.client
from openpi_client import msgpack_numpy
from openpi_client.websocket_client_policy import WebsocketClientPolicy
from websockets.exceptions import ConnectionClosed


def pack_object():
    """The fixed object whose openpi encoding the tests compare with ours (same in test_serve.py)."""
    return {"observation/image": np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3),
            "observation/state": np.array([0.5, -1.25], np.float32), "big_endian": np.array([1, 2], ">i2"),
            "flags": np.array([True, False]), "scalar": np.float32(1.5), "int": np.int64(-7),
            "prompt": "pick up the cube", "nested": {"list": [1, 2.5, None, True], "bytes": b"\x00\x01"}}


def resolve(value, arrays):
    if isinstance(value, str) and value.startswith("@"):
        return arrays[value[1:]]
    if isinstance(value, dict):
        return {k: resolve(v, arrays) for k, v in value.items()}
    return value


def plain(x):
    """An answer as JSON (arrays replaced by their dtype and shape)."""
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, np.ndarray):
        return {"dtype": x.dtype.str, "shape": list(x.shape)}
    if isinstance(x, np.generic):
        return x.item()
    return x


def save_arrays(prefix, answer, out_arrays):
    for k, v in answer.items():
        if isinstance(v, np.ndarray):
            out_arrays[f"{prefix}/{k}"] = v


def run_steps(spec, arrays, out, out_arrays):
    host, port = spec["host"], spec["port"]
    clients = {}
    for i, step in enumerate(spec.get("steps", [])):
        if "vanish" in step:
            with websockets.sync.client.connect(f"ws://{host}:{port}", compression=None, max_size=None) as ws:
                ws.recv()
                ws.send(msgpack_numpy.packb(resolve(step["vanish"], arrays)))
            out["steps"].append({"vanished": True})
            continue
        name = step["client"]
        if name not in clients:
            clients[name] = WebsocketClientPolicy(host, port)
            out["metadata"][name] = plain(clients[name].get_server_metadata())
        client = clients[name]
        try:
            if "request" in step:
                answer = client.infer(resolve(step["request"], arrays))
                save_arrays(str(i), answer, out_arrays)
                out["steps"].append({"answer": plain(answer)})
                continue
            if "close" in step:
                client._ws.close()
                del clients[name]
                out["steps"].append({"closed_by_client": True})
                continue
            client._ws.send(arrays[step["raw"][1:]].tobytes() if "raw" in step else step["text"])
            response = client._ws.recv()
            if isinstance(response, str):
                out["steps"].append({"error": response})
            else:
                answer = msgpack_numpy.unpackb(response)
                save_arrays(str(i), answer, out_arrays)
                out["steps"].append({"answer": plain(answer)})
        except RuntimeError as e:
            out["steps"].append({"error": str(e)})
        except ConnectionClosed as e:
            out["steps"].append({"closed": str(e), "code": e.rcvd.code if e.rcvd else None})
            del clients[name]
    for client in clients.values():
        client._ws.close()


def run_load(spec, arrays, out, out_arrays):
    load = spec["load"]
    episodes = [[resolve(r, arrays) for r in ep] for ep in load["episodes"]]
    results = [None] * load["clients"]

    def worker(i):
        client = WebsocketClientPolicy(spec["host"], spec["port"])
        ep = episodes[i % len(episodes)]
        latencies, actions = [], []
        for j in range(load["requests"]):
            t0 = time.perf_counter()
            answer = client.infer(ep[j % len(ep)])
            latencies.append((time.perf_counter() - t0) * 1000)
            actions.append(answer["actions"])
        client._ws.close()
        results[i] = (latencies, actions)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(load["clients"])]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out["load"] = {"seconds": time.perf_counter() - t0, "latency_ms": [r[0] for r in results]}
    for i, (_, actions) in enumerate(results):
        out_arrays[f"load/{i}"] = np.stack(actions)


def main(spec_path, out_path):
    with open(spec_path) as f:
        spec = json.load(f)
    arrays = dict(np.load(spec["arrays"])) if spec.get("arrays") else {}
    out, out_arrays = {"metadata": {}, "steps": []}, {}
    if spec.get("pack"):
        out["pack"] = msgpack_numpy.packb(pack_object()).hex()
    if spec.get("unpack"):
        obj = msgpack_numpy.unpackb(bytes.fromhex(spec["unpack"]))
        want = pack_object()
        out["unpack_equal"] = sorted(obj) == sorted(want) and all(
            np.array_equal(obj[k], want[k]) and np.asarray(obj[k]).dtype == np.asarray(want[k]).dtype
            for k in want if k != "nested") and obj["nested"] == want["nested"]
    run_steps(spec, arrays, out, out_arrays)
    if spec.get("load"):
        run_load(spec, arrays, out, out_arrays)
    np.savez(out_path + ".npz", **out_arrays)
    with open(out_path, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
