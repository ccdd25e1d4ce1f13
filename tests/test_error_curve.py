"""A transplant's reconstruction error by k (issue 18's transplant picture).

The curve is read off the pursuit's projections; it is checked against
scikit-learn's OMP run separately at every k (exact path), against a
least-squares refit on each prefix of the picked atoms (screened path, whose
picks differ from exact), and end to end: the CLI, the Python API and a
recipe whose last step is a transplant all put the picture and its numbers
beside the card.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from surgeon.cli import main
from surgeon.transplant.error_curve import existing_section, summarize
from surgeon.transplant.omp import batch_omp, omp_exact

REPO = Path(__file__).resolve().parents[1]
ZOO = REPO / "zoo"


def _lstsq_error(Y: torch.Tensor, A: torch.Tensor, idx: torch.Tensor, t: int) -> np.ndarray:
    """Relative error of the least-squares fit of each target on its first t picked atoms (float64)."""
    out = []
    for y, row in zip(Y.double().numpy(), idx.numpy()):
        atoms = A.double().numpy()[row[:t]].T
        c, *_ = np.linalg.lstsq(atoms, y, rcond=None)
        out.append(np.linalg.norm(y - atoms @ c) / np.linalg.norm(y))
    return np.array(out)


def test_exact_curve_equals_scikit_learn_run_at_every_k():
    sk = pytest.importorskip("sklearn.linear_model")
    g = torch.Generator().manual_seed(3)
    A, Y = torch.randn(300, 24, generator=g), torch.randn(25, 24, generator=g)
    res = torch.full((25, 12), -1.0)
    batch_omp(Y, A, 12, progress=False, residuals=res, batch_size=7)  # several batches
    for t in range(1, 13):
        C = sk.orthogonal_mp(A.T.double().numpy(), Y.T.double().numpy(), n_nonzero_coefs=t)
        want = np.linalg.norm(Y.double().numpy() - (A.double().numpy().T @ C).T, axis=1) / np.linalg.norm(
            Y.double().numpy(), axis=1)
        np.testing.assert_allclose(res[:, t - 1].numpy(), want, atol=2e-5)
    assert (res[:, 1:] <= res[:, :-1] + 1e-6).all()  # more atoms never fit worse


def test_screened_curve_equals_the_refit_on_its_own_picks():
    g = torch.Generator().manual_seed(4)
    A, Y = torch.randn(400, 32, generator=g), torch.randn(10, 32, generator=g)
    res = torch.empty(10, 9)
    idx, _ = batch_omp(Y, A, 9, screen=40, refresh=3, progress=False, residuals=res)
    for t in (1, 4, 9):
        np.testing.assert_allclose(res[:, t - 1].numpy(), _lstsq_error(Y, A, idx, t), atol=2e-5)


def test_an_early_stop_keeps_the_last_error_and_a_zero_target_has_none():
    A = torch.eye(6)[:3].repeat(2, 1)  # 6 atoms spanning 3 dimensions
    Y = torch.tensor([[1.0, 2.0, 0.0, 0.0, 0.0, 3.0], [0.0] * 6])
    res = torch.empty(2, 5)
    omp_exact(Y, A, 5, residuals=res)
    y = Y[0].double()
    np.testing.assert_allclose(res[0].numpy(), [float(((y ** 2).sum() - 4) / (y ** 2).sum()) ** 0.5 if i == 0 else
                                                float(9 / 14) ** 0.5 for i in range(5)], atol=1e-6)
    assert res[1].eq(0).all()


def test_summary_percentiles_are_numpys():
    r = torch.rand(101, 4, generator=torch.Generator().manual_seed(0))
    s = summarize(r)
    assert s["k"] == [1, 2, 3, 4] and s["targets"] == 101
    for key, q in (("p10", 0.1), ("median", 0.5), ("p90", 0.9)):
        np.testing.assert_allclose(s[key], np.quantile(r.double().numpy(), q, axis=0), atol=1e-5)
    np.testing.assert_allclose(s["mean"], r.double().mean(0).numpy(), atol=1e-5)


def test_transplant_cli_draws_the_curve_into_its_card(tmp_path, capsys):
    out = tmp_path / "t"
    assert main(["transplant", str(ZOO / "bpe-base"), str(ZOO / "sp-base"), str(out), "--k", "8", "-q",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (out / "omp_error.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["error_by_k"] == {"json": str(out / "omp_error.json"), "png": str(out / "omp_error.png")}
    data = json.loads((out / "omp_error.json").read_text())
    curve = data["curves"]["embed"]
    assert data["k_used"] == 8 and curve["k"] == list(range(1, 9)) and curve["targets"] == 563
    # the last point is the fit the transplant ended with (computed separately from the written rows' coefficients)
    assert curve["mean"][-1] == pytest.approx(report["approximation"]["embed"]["donor_rel_error_mean"], abs=1e-4)
    card = (out / "README.md").read_text()
    assert "## Reconstruction error by k" in card and "![reconstruction error by k](omp_error.png)" in card
    assert "at k=8 (563 new tokens)" in card


def test_without_matplotlib_the_transplant_card_says_how(tmp_path, monkeypatch):
    monkeypatch.setenv("SURGEON_NO_PLOT", "1")
    out = tmp_path / "t"
    assert main(["transplant", str(ZOO / "bpe-base"), str(ZOO / "sp-base"), str(out), "--k", "4", "-q"]) == 0
    assert not (out / "omp_error.png").exists() and (out / "omp_error.json").is_file()
    assert "pip install 'surgeon[plot]'" in (out / "README.md").read_text()


def test_non_omp_transplants_draw_no_curve(tmp_path):
    out = tmp_path / "t"
    assert main(["transplant", str(ZOO / "bpe-base"), str(ZOO / "sp-base"), str(out), "--method", "mean", "-q"]) == 0
    assert not (out / "omp_error.json").exists() and "Reconstruction error" not in (out / "README.md").read_text()


def test_a_recipe_ending_in_a_transplant_shows_the_curve(tmp_path):
    recipe = tmp_path / "t.yaml"
    out = tmp_path / "out"
    recipe.write_text(f"models: {{base: {ZOO / 'bpe-base'}, donor: {ZOO / 'sp-base'}}}\n"
                      "steps:\n  - id: t\n    transplant: {model: base, donor: donor, k: 6}\n"
                      f"output: {{path: {out}}}\n")
    assert main(["run", str(recipe), "-q"]) == 0
    card = (out / "README.md").read_text()
    assert "![reconstruction error by k](omp_error.png)" in card and "at k=6 (563 new tokens)" in card
    assert existing_section(out) in card
    # a rerun finds the step done and keeps the picture in the card
    assert main(["run", str(recipe), "-q", "--overwrite"]) == 0
    assert "![reconstruction error by k](omp_error.png)" in (out / "README.md").read_text()
