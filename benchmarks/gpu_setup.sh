# Device setup: `source benchmarks/gpu_setup.sh` in the repo root on a GPU machine with JAX 0.11.2.
# Installs longax (no deps: the image has them) and the peers' wheels from .whl/ if present
# (see README: Benchmarks), into /tmp/site on PYTHONPATH.
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v -i warning || true
export PYTHONUNBUFFERED=1
