# Source on a bare accelerator machine from the repository root: makes `gptoss_jax` importable
# (with sharding/, converters/, configs/ mapped in, as pyproject.toml does) without pip,
# and uses the flax copied into .whl/ when the machine's flax is older than 0.12.
rm -rf /tmp/gptoss_pkg && mkdir -p /tmp/gptoss_pkg
cp -r gptoss_jax /tmp/gptoss_pkg/
for sub in sharding converters configs; do cp -r "$sub" "/tmp/gptoss_pkg/gptoss_jax/$sub"; done
export PYTHONPATH=/tmp/gptoss_pkg
if ! python3 -c "import flax, sys; v = tuple(int(p) for p in flax.__version__.split('.')[:2]); sys.exit(v < (0, 12))" 2>/dev/null; then
  [ -d .whl/flax ] && export PYTHONPATH=/tmp/gptoss_pkg:$PWD/.whl
fi
export PYTHONUNBUFFERED=1
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
