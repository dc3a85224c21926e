"""The mixer ablation of benchmarks/RESULTS.md: the embedded model trained on the robot phase alone
for 3,000 steps with one token-mixer pattern, everything else equal (data/small, the same seed and
steps), then evaluated on long held-out episodes up to 8x the training horizon.

`--config=ablation_mixers:<pattern>` with pattern one of
  hybrid  [swa, swa, dswa, gdn] (the default)
  swa     sliding-window attention only
  gdn     gated delta rule only
  full    block-causal full attention
"""

from experiments import base, sizes

PATTERNS = {"hybrid": ("swa", "swa", "dswa", "gdn"), "swa": ("swa",) * 4, "gdn": ("gdn",) * 4,
            "full": ("full",) * 4}


def get_config(arg: str = "hybrid"):
    if arg not in PATTERNS:
        raise ValueError(f"ablation_mixers: unknown pattern {arg!r} (one of {sorted(PATTERNS)})")
    c = base.get_base_config()
    sizes.apply_size(c, "embedded")
    c.model.pattern = PATTERNS[arg]
    c.model.proprio_input = False     # as the ablation in benchmarks/RESULTS.md was measured
    c.data.root = "data/small"
    c.curriculum = ("phase3_robot",)
    c.phases = base.ml_collections.ConfigDict({"phase3_robot": base.phase3_robot(3000)})
    # reference_noise: the residual head learns not to trust its reference frame, which in a long
    # rollout is its own previous prediction (without it every pattern's error random-walks;
    # benchmarks/RESULTS.md, "Long rollouts").
    c.train.update(dict(lr=3e-3, warmup_steps=100, log_every=50, checkpoint_every=500, reference_noise=0.3))
    c.eval.update(dict(every=1000, root="data/heldout"))
    return c
