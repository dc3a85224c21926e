"""Serve a trained model over openpi's websocket protocol, as a policy or as a simulator.

    python -m kairos_jax.serve --checkpoint=runs/embedded [--host=127.0.0.1] [--port=8000] [--mode=policy]

--checkpoint: a training workdir, one of its phase folders, or an export folder; the statistics the
model was trained with (stats/ beside its config.json) normalise observations and denormalise
actions. Clients: `openpi_client.websocket_client_policy.WebsocketClientPolicy(host, port).infer(obs)`
with obs = {"observation/image": uint8 [H, W, 3], "prompt": str, "embodiment": str}; the protocol
(keys, episodes, errors, limits) is in kairos_jax/inference/serving.py.

A model reading precomputed text embeddings (model.text_encoder='precomputed') looks each episode's
prompt up in the text embeddings its run saved; an unknown prompt is answered with an error naming it,
unless --text_encoder=module:function (the encoder the model was trained with; checked against the
stored embeddings at start) embeds new prompts on the fly.

Binds to loopback unless --host says otherwise; --port=0 picks a free port. Prints one line
"serving <mode> of <model> on ws://<host>:<port>" when it accepts connections, and runs until
SIGINT / SIGTERM (exit 0) or --exit_after_idle_s without a connection. Exit status 2: a user
mistake (a flag, a checkpoint that cannot be served, an address that cannot be bound).
"""

from __future__ import annotations

import asyncio
import logging
import signal

from absl import flags

from kairos_jax import cli

_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0: every interface).")
_PORT = flags.DEFINE_integer("port", 8000, "Port to listen on (0: a free one, printed).", lower_bound=0,
                             upper_bound=65535)
_MAX_MESSAGE_MB = flags.DEFINE_float("max_message_mb", 16.0, "Largest request accepted, MiB; a larger one "
                                     "closes its connection (code 1009).", lower_bound=0.001)
_EXIT_AFTER_IDLE_S = flags.DEFINE_float("exit_after_idle_s", 0.0, "Stop after this many seconds without a "
                                        "connection (0: never).", lower_bound=0.0)
_TEXT_ENCODER = flags.DEFINE_string("text_encoder", None, "A model reading precomputed text: module:function that "
                                    "embeds prompts its run's text embeddings lack (the training's encoder).")
_WARMUP = flags.DEFINE_bool("warmup", True, "Compile the model's functions before accepting connections.")


def main(argv) -> None:
    del argv
    logging.getLogger("kairos").setLevel(logging.INFO)
    logging.getLogger("websockets").setLevel(logging.WARNING)     # we log connections ourselves
    from kairos_jax.inference.serving import MODES, BindError, ServedModel, Server

    cli.require(checkpoint=cli.CHECKPOINT.value)
    mode = cli.MODE.value or "policy"
    if mode not in MODES:
        raise cli.UsageError(f"--mode={mode}: serve takes one of {list(MODES)}")
    model = ServedModel.from_checkpoint(cli.CHECKPOINT.value, mode=mode, seed=cli.SEED.value,
                                        data_root=cli.DATA_ROOT.value, text_encoder=_TEXT_ENCODER.value)
    if _WARMUP.value:
        logging.getLogger("kairos.serve").info("compiled in %.1f s", model.warm_up())
    server = Server(model, host=_HOST.value, port=_PORT.value,
                    max_message_bytes=int(_MAX_MESSAGE_MB.value * (1 << 20)),
                    exit_after_idle_s=_EXIT_AFTER_IDLE_S.value)

    def ready(host, port):
        print(f"serving {mode} of {model.name} ({', '.join(sorted(model.embodiments))}) on ws://{host}:{port}",
              flush=True)

    async def serve():
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, server.stop)
        await server.serve(ready=ready)

    try:
        asyncio.run(serve())
    except BindError as e:
        raise cli.UsageError(f"--host={_HOST.value} --port={_PORT.value}: {e.strerror}") from None
    print(f"stopped after {server.requests} requests", flush=True)


def run() -> None:
    cli.run(main)


if __name__ == "__main__":
    run()
