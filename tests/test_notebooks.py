"""Every notebook in notebooks/ runs top to bottom on a small store of real runs.

The store holds tiny real training runs (both settings, two models, two seeds, two S) plus one
diverged run, so the notebooks meet the shapes a sweep produces, including the awkward ones.
Notebooks that train (new_feature_map) run with FWM_NOTEBOOK_QUICK=1: a sweep of seconds.
"""
from pathlib import Path

import nbformat
import pytest
import torch
from nbclient import NotebookClient

from training.config import RunConfig
from training.store import ResultsStore
from training.trainer import train

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
MODELS = [dict(feature_map="linear", rule="sum"),
          dict(feature_map="dpfp", feature_options={"nu": 1}, rule="delta")]


@pytest.fixture(scope="module")
def results():
    """Real runs: 2 settings x 2 models x S in (8, 12) x 2 seeds, 200 steps each."""
    # Models this small gain nothing from intra-op threads, and on a busy machine competing
    # threads slow each run down tenfold: train on one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = [train(RunConfig(setting=setting, num_pairs=S, max_steps=200, seed=seed, **model),
                      progress=False)
                for setting in ("capacity", "overwrite") for model in MODELS
                for S in (8, 12) for seed in (0, 1)]
    finally:
        torch.set_num_threads(threads)
    # A run that blew up after one evaluation, as FAVOR+ with the delta rule does in the paper.
    template = runs[-1]
    config = RunConfig.from_dict({**template["config"], "seed": 2})
    runs.append({**template, "run_id": config.run_id, "config": config.to_dict(), "seed": 2,
                 "status": "diverged",
                 "solved": 0, "curve": template["curve"][:1],
                 "best_eval_loss": template["curve"][0][1], "final_eval_loss": template["curve"][0][1],
                 "best_step": template["curve"][0][0]})
    return runs


def write_store(path, records):
    with ResultsStore(path) as store:
        for record in records:
            store.put_run(record)
    return path


def execute(notebook: Path, store: Path, monkeypatch):
    """Run a notebook in a fresh kernel from notebooks/ with FWM_STORE pointing at ``store``."""
    # The kernel inherits this process's environment when it starts.
    monkeypatch.setenv("FWM_STORE", str(store))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("FWM_NOTEBOOK_QUICK", "1")     # notebooks that train use tiny sweeps
    nb = nbformat.read(notebook, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()  # raises on a cell error
    return nb


def printed(nb) -> str:
    return "".join(output.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                   for output in cell.outputs if output.output_type == "stream")


def test_notebooks_are_stored_without_outputs():
    notebooks = sorted(NOTEBOOKS.glob("*.ipynb"))
    assert {path.stem for path in notebooks} >= {"capacity", "update_rules", "tasks"}
    for path in notebooks:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        assert all(not cell.get("outputs") and not cell.get("execution_count")
                   for cell in nb.cells if cell.cell_type == "code"), path.name


@pytest.mark.parametrize("notebook", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda path: path.stem)
def test_notebook_runs(notebook, results, tmp_path, monkeypatch):
    store = write_store(tmp_path / "retrieval.sqlite", results)
    # Temporary folders the kernel makes (new_feature_map's map file and sweep store) go into
    # tmp_path, not the system's temp folder.
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    nb = execute(notebook, store, monkeypatch)
    if notebook.stem != "tasks":
        assert list((tmp_path / "figures").glob("*.png")), "the notebook saved no figure"
        assert "no runs" not in printed(nb)
    if notebook.stem == "new_feature_map":
        text = printed(nb)
        assert "SquaredReLUPair passes the contract: d_dot = 128" in text
        assert "outputs 128 features but declares d_dot = 64" in text      # the broken variants
        assert "which needs phi(x) >= 0" in text
        assert "6 runs trained" in text and "0 failed" in text             # 3 models x S in {6, 10}
        assert text.count("| capacity |") == 3                             # the S* table
        # The map file and the sweep store were written outside the repository.
        work = [path.parent for path in tmp_path.glob("fwm-new-feature-map-*/capacity.sqlite")]
        assert len(work) == 1 and (work[0] / "my_map.py").is_file()


def test_notebooks_skip_what_the_store_lacks(results, tmp_path, monkeypatch):
    capacity_only = write_store(tmp_path / "capacity.sqlite",
                                [run for run in results if run["setting"] == "capacity"])
    assert "no overwrite runs" in printed(execute(NOTEBOOKS / "update_rules.ipynb", capacity_only,
                                                  monkeypatch))
    missing = tmp_path / "missing" / "none.sqlite"
    assert "no capacity runs" in printed(execute(NOTEBOOKS / "capacity.ipynb", missing, monkeypatch))
    assert not missing.exists()
