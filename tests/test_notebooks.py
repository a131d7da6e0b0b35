"""The notebooks (notebooks/*.ipynb) run top to bottom in a Jupyter kernel with the CI
parameters (the `tiny` preset on the CPU, few tokens), and each .ipynb holds the same cells
as its jupytext py:percent pair. Marked notebooks; the four runs took 506 s on a shared
2-core machine (finetune_lora 211 s, gpt_oss_120b_tpu_v5e8 163 s, quickstart 71 s,
inside_gpt_oss 61 s)."""

import json
import os
import sys
import time
from pathlib import Path

import jupytext
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
CI_PARAMETERS = {
    "quickstart": {"model_name": "tiny", "max_new_tokens": 8},
    # The plan cell compiles the tiny preset for the v5e-8 (gpt-oss-120b's plan is tests/test_tpu_aot.py's).
    "gpt_oss_120b_tpu_v5e8": {"checkpoint": "tiny", "plan_model": "tiny", "context": 1024, "max_new_tokens": 8},
    "finetune_lora": {"checkpoint": "tiny", "steps": 4, "seq_len": 256, "max_new_tokens": 8},
    "inside_gpt_oss": {"checkpoint": "tiny"},
}


def test_every_notebook_is_run_here():
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == sorted(CI_PARAMETERS)


@pytest.mark.parametrize("name", sorted(CI_PARAMETERS))
def test_ipynb_and_py_percent_pair_hold_the_same_cells(name):
    """Edit the .py and run `jupytext --sync notebooks/NAME.py` (notebooks/README.md)."""
    paired = jupytext.read(NOTEBOOKS / f"{name}.py")
    stored = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    cells = lambda nb: [(c.cell_type, c.source.strip(), c.metadata.get("tags", [])) for c in nb.cells]
    assert cells(stored) == cells(paired)
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in stored.cells if c.cell_type == "code")
    assert sum("parameters" in tags for _, _, tags in cells(stored)) == 1


@pytest.fixture(scope="module")
def kernel(tmp_path_factory, monkeypatch_module):
    """A kernel spec running this interpreter on this checkout's package."""
    from ipykernel.kernelspec import install

    prefix = tmp_path_factory.mktemp("jupyter")
    install(prefix=str(prefix), kernel_name="gptoss-jax-tests")
    monkeypatch_module.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
    monkeypatch_module.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    spec = json.loads((prefix / "share" / "jupyter" / "kernels" / "gptoss-jax-tests" / "kernel.json").read_text())
    assert spec["argv"][0] == sys.executable
    return "gptoss-jax-tests"


@pytest.fixture(scope="module")
def monkeypatch_module():
    patch = pytest.MonkeyPatch()
    yield patch
    patch.undo()


@pytest.mark.notebooks
@pytest.mark.parametrize("name", sorted(CI_PARAMETERS))
def test_notebook_runs_top_to_bottom(name, kernel, tmp_path):
    import papermill

    began = time.perf_counter()
    papermill.execute_notebook(NOTEBOOKS / f"{name}.ipynb", tmp_path / f"{name}.ipynb", parameters=CI_PARAMETERS[name],
                               kernel_name=kernel, cwd=str(tmp_path), progress_bar=False, log_output=False)
    print(f"{name}: {time.perf_counter() - began:.0f} s")
    ran = nbformat.read(tmp_path / f"{name}.ipynb", as_version=4)
    errors = [o for c in ran.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
