#!/usr/bin/env bash
# Builds .venv-metaworld, Meta-World's own virtualenv (issue 14): metaworld==3.1.1 pins mujoco==3.3.0,
# which conflicts with dm_control's mujoco in .venv. It also holds the evaluation client's
# openpi-client (which pins numpy < 2; its websocket client imports typing_extensions without
# declaring it) and what the project's LeRobot writer and video module import there: pyarrow (< 21:
# newer ones need numpy 2), av, fsspec; gymnasium's MuJoCo module imports packaging undeclared.
#
#   bash launch/metaworld_venv.sh [VENV_DIR]        (default .venv-metaworld; PYTHON=python3.11 ...)
#
# Then (frames render headless with EGL; MUJOCO_GL=osmesa where there is no EGL):
#   MUJOCO_GL=egl .venv-metaworld/bin/python -m data_pipelines.generate --preset=metaworld --output=DIR
#   MUJOCO_GL=egl .venv-metaworld/bin/python -m benchmarks.metaworld_eval --policies=expert,random
# and `.venv/bin/python -m pytest -m metaworld tests/test_metaworld.py`.
set -euo pipefail

VENV="${1:-.venv-metaworld}"
PYTHON="${PYTHON:-python3}"
METAWORLD_VERSION="${METAWORLD_VERSION:-3.1.1}"
OPENPI_CLIENT_VERSION="${OPENPI_CLIENT_VERSION:-0.1.2}"

if ! "$PYTHON" -c 'import sys; assert (3, 10) <= sys.version_info[:2] < (3, 14)' >/dev/null 2>&1; then
  echo "error: metaworld==$METAWORLD_VERSION needs Python 3.10 to 3.13; pass PYTHON=/path/to/python3.11" >&2
  exit 1
fi
if [ -f "$VENV/.installed" ]; then
  echo "$VENV is up to date (remove $VENV/.installed to rebuild)"
  exit 0
fi
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "metaworld==$METAWORLD_VERSION" "openpi-client==$OPENPI_CLIENT_VERSION" \
  typing_extensions packaging "pyarrow<21" av fsspec
# the imports every Meta-World command needs, and one rendered frame
MUJOCO_GL="${MUJOCO_GL:-egl}" PYTHONPATH="$(pwd)" "$VENV/bin/python" - <<'EOF'
import openpi_client.websocket_client_policy  # noqa: F401
import data_pipelines.writers.lerobot  # noqa: F401
from data_pipelines.sim.metaworld_record import MetaWorldTask

with MetaWorldTask("reach-v3", 64) as mw:
    mw.reset(0)
    assert mw.frame().shape == (64, 64, 3)
print("metaworld venv ok")
EOF
touch "$VENV/.installed"
