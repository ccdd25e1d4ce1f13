"""Hub models in, merged models out: against a local fake hub, never the network.

The fake hub (tests/hub_server.py) serves the endpoints huggingface-hub calls;
``point_hf_at`` redirects huggingface-hub to it with a fresh HF_HOME per test.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from hub_server import FakeHub, build_tiny_model, point_hf_at  # noqa: E402

from surgeon import api  # noqa: E402
from surgeon.errors import CheckpointError, InvalidInputError, StepError  # noqa: E402
from surgeon.io import Checkpoint  # noqa: E402
from surgeon.io import hub as hubio  # noqa: E402
from surgeon.io.card import CardInfo, CardInput, render_card  # noqa: E402
from surgeon.io.refs import parse_ref  # noqa: E402
from surgeon.io.remote import RemoteCheckpoint  # noqa: E402

TOKEN = "hf_TestTokenAbcdefghijklmnop0123"
BAD_TOKEN = "hf_WrongTokenZyxwvutsrqponm9876"
REPO_ROOT = Path(__file__).resolve().parent.parent
SEEDED = "dare_ties" if "dare_ties" in __import__("surgeon.merge", fromlist=["all_methods"]).all_methods() \
    else "task_arithmetic"


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    return {
        "base": build_tiny_model(root / "base", 0),
        "base2": build_tiny_model(root / "base2", 10),  # a later commit on org/base main
        "math": build_tiny_model(root / "math", 1, shards=2),
        "code": build_tiny_model(root / "code", 2),
        "wide": build_tiny_model(root / "wide", 3, hidden=48),
        "pickled": _pickled_only(root / "pickled"),
    }


def _pickled_only(folder: Path) -> Path:
    folder.mkdir(parents=True)
    torch.save({"model.embed_tokens.weight": torch.ones(4, 2)}, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 2}))
    (folder / "training_args.bin").write_bytes(b"not weights")
    return folder


@pytest.fixture(scope="module")
def hub(sources: dict[str, Path]):
    with FakeHub(token=TOKEN) as h:
        h.shas = {}
        h.shas["base@v1"] = h.add_folder("org/base", sources["base"], message="v1")
        h.tag("org/base", "v1", h.shas["base@v1"])
        # main moves on after the tag: a ref to @v1 must not see this commit
        h.shas["base@main"] = h.add_folder("org/base", sources["base2"], message="retrain")
        h.shas["math"] = h.add_folder("org/math", sources["math"])
        h.shas["code"] = h.add_folder("org/code", sources["code"])
        h.repos["org/code"].branches["dev"] = h.shas["code"]
        h.shas["code@dev"] = h.add_commit("org/code", {"notes.txt": b"dev"}, branch="dev")
        h.shas["wide"] = h.add_folder("org/wide", sources["wide"])
        h.shas["pickled"] = h.add_folder("org/pickled", sources["pickled"])
        h.shas["private"] = h.add_folder("org/secret", sources["code"], private=True)
        yield h


@pytest.fixture
def hf(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """huggingface-hub pointed at the fake hub, with an empty cache; returns the env for subprocesses."""
    env = point_hf_at(monkeypatch, hub.url, tmp_path / "hf-home", token=TOKEN)
    hub.reset_counters()
    return env


def _go_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as C

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(C, "HF_HUB_OFFLINE", True)


def _cached_files(env: dict[str, str]) -> list[str]:
    return sorted(p.name for p in Path(env["HF_HUB_CACHE"]).rglob("*") if p.is_file() or p.is_symlink())


# -- references ------------------------------------------------------------------
def test_parse_ref_forms(tmp_path: Path) -> None:
    r = parse_ref("org/name")
    assert (r.is_hub, r.repo_id, r.revision) == (True, "org/name", None)
    r = parse_ref("org/name@v1.2")
    assert (r.repo_id, r.revision) == ("org/name", "v1.2")
    r = parse_ref("hf://org/name@" + "a" * 40)
    assert (r.repo_id, r.revision) == ("org/name", "a" * 40)
    assert parse_ref("hf://org/name").revision is None
    assert not parse_ref(str(tmp_path)).is_hub
    assert not parse_ref("./org/name").is_hub


# -- resolving -------------------------------------------------------------------
def test_headers_only_reads_no_weights(hub: FakeHub, hf: dict[str, str], sources: dict[str, Path]) -> None:
    sha = hub.shas["math"]
    res = hubio.resolve(f"org/math@{sha}", headers_only=True)
    ck = res.checkpoint
    assert isinstance(ck, RemoteCheckpoint) and res.headers_only and res.revision == sha
    local = Checkpoint.open(sources["math"])
    assert sorted(ck.names) == sorted(local.names)
    for name in local.names:
        a, b = ck.info(name), local.info(name)
        assert (a.shape, a.dtype, a.nbytes) == (b.shape, b.dtype, b.nbytes)
    assert ck.total_bytes == local.total_bytes and ck.num_parameters == local.num_parameters
    assert ck.config == local.config and ck.num_layers == 2 and ck.tied_embeddings is False
    assert ck.has_tokenizer and {f.name for f in ck.tokenizer_files} == {"tokenizer.json", "tokenizer_config.json"}
    assert "org/math" in ck.label and sha[:12] in ck.label
    with pytest.raises(CheckpointError, match="headers only"):
        ck.get("lm_head.weight")
    with pytest.raises(CheckpointError, match="no tensor"):
        ck.info("nope")
    # no tensor byte crossed the wire, and only small files were fetched
    assert hub.weight_bytes_served() == 0
    assert hub.files_downloaded() == {"config.json", "generation_config.json", "tokenizer.json",
                                      "tokenizer_config.json", "model.safetensors.index.json"}
    assert not any(n.endswith((".safetensors", ".bin", ".pt")) for n in _cached_files(hf))
    # every shard header was read with small range requests
    ranges = [s for s in hub.served if s.path.endswith(".safetensors")]
    assert {s.path for s in ranges} == {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
    assert all(s.weight_bytes == 0 for s in ranges)


def test_revision_pinning(hub: FakeHub, hf: dict[str, str]) -> None:
    assert hubio.resolve("org/base@v1", headers_only=True).revision == hub.shas["base@v1"]
    assert hubio.resolve("org/base", headers_only=True).revision == hub.shas["base@main"]
    assert hubio.resolve("hf://org/base@main", headers_only=True).revision == hub.shas["base@main"]
    assert hubio.resolve("org/code@dev", headers_only=True).revision == hub.shas["code@dev"]
    # the tag's weights, not main's
    v1 = hubio.resolve("org/base@v1").checkpoint
    main = hubio.resolve("org/base").checkpoint
    assert not torch.equal(v1.get("lm_head.weight"), main.get("lm_head.weight"))
    with pytest.raises(InvalidInputError, match=r"org/base@nope: no such branch, tag or commit"):
        hubio.resolve("org/base@nope", headers_only=True)
    with pytest.raises(InvalidInputError, match=r"org/missing: repository not found"):
        hubio.resolve("org/missing", headers_only=True)


def test_private_repo_needs_the_token(hub: FakeHub, hf: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    assert hubio.resolve("org/secret", headers_only=True).revision == hub.shas["private"]
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(InvalidInputError, match="HF_TOKEN") as err:
        hubio.resolve("org/secret", headers_only=True)
    assert TOKEN not in str(err.value)


def test_download_fetches_only_what_a_step_needs(hub: FakeHub, hf: dict[str, str], sources: dict[str, Path]) -> None:
    res = hubio.resolve("org/math")
    ck = res.checkpoint
    assert isinstance(ck, Checkpoint) and not getattr(ck, "headers_only", False)
    local = Checkpoint.open(sources["math"])
    for name in local.names:
        assert torch.equal(ck.get(name), local.get(name))
    present = sorted(p.name for p in Path(res.path).iterdir())
    assert present == sorted(["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                              "model.safetensors.index.json", "model-00001-of-00002.safetensors",
                              "model-00002-of-00002.safetensors"])
    served = {s.path for s in hub.served}
    assert not served & {"README.md", "pytorch_model.bin", "training_args.bin", "optimizer.pt"}
    # a header-only resolve after the download reads the cache, not the network
    hub.reset_counters()
    again = hubio.resolve("org/math", headers_only=True)
    assert isinstance(again.checkpoint, Checkpoint) and not hub.served


def test_pickles_are_refused_unless_opted_in(hub: FakeHub, hf: dict[str, str]) -> None:
    with pytest.raises(CheckpointError, match="only pickled weights"):
        hubio.resolve("org/pickled", headers_only=True)
    with pytest.raises(CheckpointError, match="allow-pickle"):
        hubio.resolve("org/pickled")
    assert "pytorch_model.bin" not in {s.path for s in hub.served}
    ck = hubio.resolve("org/pickled", allow_pickle=True).checkpoint
    assert ck.get("model.embed_tokens.weight").shape == (4, 2)
    assert "training_args.bin" not in {s.path for s in hub.served}


def test_offline_uses_the_cache(hub: FakeHub, hf: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    online = hubio.resolve("org/base@v1")
    hubio.resolve("org/code@main", headers_only=True)  # small files only
    hub.reset_counters()
    _go_offline(monkeypatch)
    res = hubio.resolve("org/base@v1")  # a tag, resolved through the cache's refs/
    assert res.revision == online.revision
    assert torch.equal(res.checkpoint.get("lm_head.weight"), online.checkpoint.get("lm_head.weight"))
    assert hubio.resolve(f"org/base@{online.revision}", headers_only=True).revision == online.revision
    with pytest.raises(InvalidInputError, match="HF_HUB_OFFLINE=1"):
        hubio.resolve("org/wide")  # never fetched
    with pytest.raises(InvalidInputError, match="HF_HUB_OFFLINE=1"):
        hubio.resolve("org/code@main")  # weights never fetched
    with pytest.raises(InvalidInputError, match="HF_HUB_OFFLINE=1"):
        hubio.check_push("org/out")
    assert hub.requests == []


# -- validate / run / push in process -------------------------------------------------
def _recipe(tmp: Path, hub: FakeHub, *, method: str = SEEDED, models: dict[str, str] | None = None,
            push: dict | None = None, name: str = "hub-mix") -> Path:
    models = models or {"base": "org/base@v1", "math": f"org/math@{hub.shas['math']}", "code": "hf://org/code@main"}
    params = {"weight": 0.6, "density": 0.5} if method.startswith(("dare", "ties", "della", "breadcrumbs")) else \
        {"weight": 0.6}
    recipe = {
        "name": name, "seed": 7, "models": models,
        "steps": [{"id": "merged", "merge": {"method": method, "base": "base",
                                             "models": [{"model": m, **params} for m in models if m != "base"],
                                             "dtype": "bfloat16"}}],
        "output": {"path": "./out", "max_shard_size": "40KB", **({"push": push} if push else {})},
    }
    p = tmp / f"{name}.yaml"
    p.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return p


def test_validate_shape_mismatch_fails_before_any_download(hub: FakeHub, hf: dict[str, str], tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, hub, models={"base": "org/base@v1", "wide": "org/wide"})
    t0 = time.time()
    with pytest.raises(InvalidInputError) as err:
        api.validate(str(recipe))
    assert time.time() - t0 < 20
    assert "shape" in str(err.value).lower() or "48" in str(err.value)
    assert hub.weight_bytes_served() == 0
    assert not any(n.endswith(".safetensors") for n in _cached_files(hf))


def test_runs_are_deterministic_and_reported(hub: FakeHub, hf: dict[str, str], tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, hub)
    summaries = api.validate(str(recipe))
    assert summaries[0]["tensors"] > 0 and hub.weight_bytes_served() == 0
    reports = []
    for i in range(2):
        out = tmp_path / f"out{i}"
        reports.append(api.run(str(recipe), output=str(out), work_dir=str(tmp_path / f"work{i}"), quiet=True))
    r = reports[0]
    assert r["schema"] == "surgeon.report/1"
    assert len(r["output"]["files"]) > 1  # sharded: every shard is hashed
    assert r["output"]["files"] == reports[1]["output"]["files"]
    assert all(len(f["sha256"]) == 64 for f in r["output"]["files"].values())
    assert {m: v["revision"] for m, v in r["inputs"].items()} == {
        "base": hub.shas["base@v1"], "math": hub.shas["math"], "code": hub.shas["code"]}
    assert r["inputs"]["base"]["hub_id"] == "org/base" and r["inputs"]["base"]["ref"] == "org/base@v1"
    step = r["steps"][0]
    assert step["parameters"]["method"] == SEEDED and step["parameters"]["model_parameters"]["math"]["density"] == 0.5
    assert isinstance(step["seconds"], float) and r["peak_rss_bytes"] > 0 and r["seconds"] >= 0
    card = (tmp_path / "out0" / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == ["org/base", "org/math", "org/code"]
    assert front["library_name"] == "transformers" and {"surgeon", "merge"} <= set(front["tags"])
    for sha in (hub.shas["base@v1"], hub.shas["math"], hub.shas["code"]):
        assert sha in card


def test_push(hub: FakeHub, hf: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
              sources: dict[str, Path]) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        (folder / f).write_bytes((sources["code"] / f).read_bytes())
    (folder / "README.md").write_text("---\nlibrary_name: transformers\n---\n# x\n")
    (folder / ".surgeon-step.json").write_text("{}")
    r = hubio.push(folder, "org/pushed", private=True, commit_message="first")
    assert r["repo"] == "org/pushed" and r["revision"] == "main"
    assert r["url"] == f"{hub.url}/org/pushed/commit/{r['commit']}"
    files = hub.files("org/pushed", r["commit"])
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= set(files)
    assert ".surgeon-step.json" not in files
    assert files["model.safetensors"] == (sources["code"] / "model.safetensors").read_bytes()
    assert hub.repos["org/pushed"].private and hub.repos["org/pushed"].messages[r["commit"]] == "first"
    # again, to a new branch of the existing repo
    r2 = hubio.push(folder, "org/pushed", revision="exp")
    assert r2["revision"] == "exp" and hub.repos["org/pushed"].branches["exp"] == r2["commit"]
    assert hub.repos["org/pushed"].branches["main"] == r["commit"]

    # a bad token: a StepError naming the status, and the token (which the server echoes) scrubbed
    monkeypatch.setenv("HF_TOKEN", BAD_TOKEN)
    with pytest.raises(StepError) as err:
        hubio.push(folder, "org/other")
    msg = str(err.value)
    assert msg.startswith("push to org/other failed: 401 unauthorized"), msg
    assert BAD_TOKEN not in msg and TOKEN not in msg and err.value.__cause__ is None
    assert BAD_TOKEN in hub.auth_seen  # it was sent, and the server quoted it back
    # no token at all, or offline: refused before any request
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(InvalidInputError, match="no Hugging Face token"):
        hubio.push(folder, "org/other")
    with pytest.raises(InvalidInputError, match="not a hub repository id"):
        hubio.push(folder, "not-a-repo", token=TOKEN)


def test_scrub() -> None:
    text = f"Authorization: Bearer {TOKEN} failed; tok={TOKEN}; other hf_abcdefghijklmnopqrstu"
    out = hubio.scrub(text, TOKEN)
    assert TOKEN not in out and "hf_abcdefghijklmnopqrstu" not in out and "Bearer ***" in out


def test_card_front_matter() -> None:
    info = CardInfo(
        name="m", operations=["merge"],
        inputs=[CardInput("a", "org/a@v1", "org/a", "1" * 40), CardInput("b", "org/a@main", "org/a", "2" * 40),
                CardInput("c", "./local", None, None)],
        steps=[{"id": "s", "kind": "merge", "models": ["b", "c"], "method": "ties", "base": "a"}],
        recipe_text="name: m\n", evaluation={"output": {"wiki": {"perplexity": 12.5, "bits_per_byte": 1.25}}})
    card = render_card(info)
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == ["org/a"] and front["base_model_relation"] == "merge"
    assert front["tags"][:2] == ["surgeon", "merge"] and front["library_name"] == "transformers"
    assert "| a | org/a@v1 | " + "1" * 40 + " |" in card and "| c | ./local | local |" in card
    assert "12.50" in card and "1.250" in card and "## Recipe" in card


# -- the command line, end to end ---------------------------------------------------
def _cli(args: list[str], env: dict[str, str], cwd: Path, **extra_env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    full.update(env)
    full.update(extra_env)
    full["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + full.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "surgeon", *args], cwd=cwd, env=full, capture_output=True,
                          text=True, timeout=300)


def test_cli_validate_run_push_offline(hub: FakeHub, hf: dict[str, str], tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, hub, push={"repo": "org/hub-mix", "revision": "v0", "commit_message": "surgeon run"})
    logs: list[str] = []

    # validate: configs and headers only
    p = _cli(["validate", str(recipe)], hf, tmp_path)
    logs += [p.stdout, p.stderr]
    assert p.returncode == 0, p.stderr
    assert "valid" in p.stdout
    assert hub.weight_bytes_served() == 0
    assert not any(n.endswith(".safetensors") for n in _cached_files(hf))

    # a shape mismatch fails validation with exit code 2, still without weights
    bad = _recipe(tmp_path, hub, models={"base": "org/base@v1", "wide": "org/wide@main"}, name="bad")
    p = _cli(["validate", str(bad)], hf, tmp_path)
    logs += [p.stdout, p.stderr]
    assert p.returncode == 2 and p.stderr.strip(), p.stderr
    assert hub.weight_bytes_served() == 0

    # run: downloads, merges, pushes
    p = _cli(["run", str(recipe), "--report", str(tmp_path / "r1.json")], hf, tmp_path)
    logs += [p.stdout, p.stderr]
    assert p.returncode == 0, p.stderr
    r1 = json.loads((tmp_path / "r1.json").read_text())
    push = r1["push"]
    assert push["repo"] == "org/hub-mix" and push["revision"] == "v0" and push["url"].endswith(push["commit"])
    assert push["url"] in p.stdout
    pushed = hub.files("org/hub-mix", "v0")
    assert set(r1["output"]["files"]) <= set(pushed) and ".surgeon-step.json" not in pushed
    card = pushed["README.md"].decode()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == ["org/base", "org/math", "org/code"]
    for mid, sha in (("base", hub.shas["base@v1"]), ("math", hub.shas["math"]), ("code", hub.shas["code"])):
        assert r1["inputs"][mid]["revision"] == sha
        assert f"| {mid} | " in card and sha in card
    assert "surgeon-recipe.yaml" in pushed

    # offline, from the cache: the same shards, byte for byte, and not one request
    hub.reset_counters()
    p = _cli(["run", str(recipe), "-o", str(tmp_path / "out-offline"), "--no-push", "--report",
              str(tmp_path / "r2.json")], hf, tmp_path, HF_HUB_OFFLINE="1")
    logs += [p.stdout, p.stderr]
    assert p.returncode == 0, p.stderr
    r2 = json.loads((tmp_path / "r2.json").read_text())
    assert r2["output"]["files"] == r1["output"]["files"]
    assert r2["inputs"] == r1["inputs"]
    assert hub.requests == []
    # offline with a push: refused up front (exit 2), before any work
    p = _cli(["run", str(recipe), "-o", str(tmp_path / "never"), "--report", str(tmp_path / "r3.json")], hf, tmp_path,
             HF_HUB_OFFLINE="1")
    logs += [p.stdout, p.stderr]
    assert p.returncode == 2 and "HF_HUB_OFFLINE" in p.stderr and not (tmp_path / "never").exists()

    # a rejected token: exit 3, a clear message, the token nowhere
    p = _cli(["push", str(tmp_path / "out"), "org/elsewhere"], hf, tmp_path, HF_TOKEN=BAD_TOKEN)
    logs += [p.stdout, p.stderr]
    assert p.returncode == 3 and "push to org/elsewhere failed: 401 unauthorized" in p.stderr, p.stderr

    # the token never appears in logs, reports, outputs or what was pushed
    written = [f.read_bytes() for d in (tmp_path / "out", tmp_path / "out-offline") for f in d.rglob("*") if f.is_file()]
    written += [(tmp_path / n).read_bytes() for n in ("r1.json", "r2.json")]
    written += list(pushed.values())
    for secret in (TOKEN, BAD_TOKEN):
        assert not any(secret in text for text in logs)
        assert not any(secret.encode() in blob for blob in written)
