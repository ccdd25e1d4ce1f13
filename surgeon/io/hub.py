"""Hugging Face hub models in, merged models out.

:func:`resolve` turns a hub reference (``org/name``, ``org/name@rev``,
``hf://org/name@rev``; ``rev`` a branch, tag or commit) into a checkpoint:

- it pins the reference to a commit sha first (``.revision``), so every file of
  one input comes from the same commit and the output can record it;
- with ``headers_only=True`` (what ``surgeon validate``/``plan`` use) it
  downloads only the small files (config, tokenizer, generation config, shard
  index) and reads the safetensors headers of the shards with HTTP range
  requests (:mod:`surgeon.io.remote`): a recipe with a shape mismatch fails in
  seconds, before any weight is downloaded;
- with ``headers_only=False`` it downloads exactly the files a step needs (those
  small files and the safetensors shards the model uses; never pickles unless
  the caller opts in, never READMEs, optimizer states or other formats)
  through huggingface-hub's cache (``snapshot_download`` with
  ``allow_patterns``, with its progress bars) and opens them as a lazy
  :class:`~surgeon.io.Checkpoint`.

With ``HF_HUB_OFFLINE=1`` references resolve from the cache alone (a branch or
tag through the cache's ``refs/``), and nothing contacts the network.

:func:`push` uploads a finished output folder: creates the repository if needed
(and the branch, when a revision is given), uploads everything except
surgeon's internal marker files in one commit, and returns the commit URL.

The token comes from ``HF_TOKEN`` or the huggingface-hub login. It is never
printed, logged or written anywhere by surgeon; every error re-raised from
here is scrubbed of it (and of anything that looks like a hub token).
"""
from __future__ import annotations

import contextlib
import fnmatch
import glob
import http
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..errors import CheckpointError, InvalidInputError, StepError
from .checkpoint import AUX_FILES, INDEX_NAME, PICKLE_PATTERNS, SINGLE_NAME, TOKENIZER_FILES, Checkpoint
from .refs import ModelRef, parse_ref

log = logging.getLogger("surgeon")

#: Files every step may need besides the weights (all small).
SMALL_FILES = ("config.json", *AUX_FILES, *TOKENIZER_FILES, INDEX_NAME)
#: Never uploaded by :func:`push`: surgeon's bookkeeping, not part of the model.
PUSH_IGNORE = (".surgeon-step.json", ".surgeon-*", "**/.surgeon-*", ".*.tmp", "*.surgeon-partial", "*.surgeon-old")

#: Pickles in model repos that are not model weights.
NOT_WEIGHTS = re.compile(r"(training_args|optimizer|scheduler|scaler|rng_state[\w-]*|trainer_state)\.(bin|pt|pth)")
_TOKEN_LIKE = re.compile(r"\bhf_[A-Za-z0-9]{8,}\b")
_BEARER = re.compile(r"(?i)(bearer\s+)[^\s'\"]+")
#: credentials written into a URL (``HF_ENDPOINT=https://user:secret@host``)
_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/@\s'\"]+@")


@dataclass
class Resolved:
    """A hub reference pinned to a commit, and its checkpoint."""

    repo_id: str
    requested: str | None  # what the reference asked for (branch, tag, sha) or None for the default branch
    revision: str  # the resolved commit sha
    path: Path  # the snapshot folder in huggingface-hub's cache
    checkpoint: Any  # Checkpoint, or RemoteCheckpoint when headers_only
    headers_only: bool
    files: list[str] = field(default_factory=list)  # files fetched (or found cached) for this checkpoint

    @property
    def id(self) -> str:
        return f"{self.repo_id}@{self.revision}"


# -- plumbing ------------------------------------------------------------------
def _hf() -> Any:
    try:
        import huggingface_hub
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise InvalidInputError(f"hub models need huggingface-hub ({exc}); pip install huggingface-hub") from None
    return huggingface_hub


def endpoint() -> str:
    """The hub URL huggingface-hub talks to (``HF_ENDPOINT``)."""
    from huggingface_hub import constants

    return constants.ENDPOINT.rstrip("/")


def is_offline() -> bool:
    from huggingface_hub import constants

    fn = getattr(constants, "is_offline_mode", None)
    return bool(fn() if callable(fn) else constants.HF_HUB_OFFLINE)


def _api(token: str | None = None) -> Any:
    return _hf().HfApi(endpoint=endpoint(), token=token)


def _known_token(token: str | None = None) -> str | None:
    if token:
        return token
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:  # an OIDC exchange or a broken token file: there is no usable token
        return None


def scrub(text: str, *tokens: str | None) -> str:
    """``text`` without any hub token in it (the given ones, the environment's, the login's)."""
    secrets = {t for t in (*tokens, os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")) if t}
    try:
        from huggingface_hub.utils import _auth

        secrets.add(_auth._get_token_from_file() or "")
    except Exception:
        pass
    for s in sorted((s for s in secrets if len(s) >= 4), key=len, reverse=True):
        text = text.replace(s, "***")
    text = _BEARER.sub(r"\1***", text)
    text = _URL_USERINFO.sub(r"\1***@", text)
    return _TOKEN_LIKE.sub("hf_***", text)


def _cache_folder(repo_id: str) -> Path:
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return Path(constants.HF_HUB_CACHE).expanduser() / repo_folder_name(repo_id=repo_id, repo_type="model")


def _describe(ref: ModelRef) -> str:
    return f"{ref.repo_id}@{ref.revision}" if ref.revision else str(ref.repo_id)


def _hub_error(exc: BaseException, what: str, token: str | None = None) -> str:
    """One scrubbed line for an exception raised by huggingface-hub."""
    hf = _hf()
    errors = hf.errors if hasattr(hf, "errors") else hf.utils
    gated = getattr(errors, "GatedRepoError", ())
    if gated and isinstance(exc, gated):
        msg = f"{what}: the repository is gated; accept its terms on the hub and set HF_TOKEN (or run `hf auth login`)"
    elif isinstance(exc, getattr(errors, "RepositoryNotFoundError", ())):
        msg = (f"{what}: repository not found on {endpoint()} (if it is private, set HF_TOKEN or run "
               "`hf auth login`)")
    elif isinstance(exc, getattr(errors, "RevisionNotFoundError", ())):
        msg = f"{what}: no such branch, tag or commit in the repository"
    elif isinstance(exc, (getattr(errors, "OfflineModeIsEnabled", ()), getattr(errors, "LocalEntryNotFoundError", ()),
                          getattr(errors, "RevisionResolutionError", ()))):
        msg = (f"{what}: not in the local cache and the hub cannot be used "
               f"({'HF_HUB_OFFLINE=1 is set' if is_offline() else 'it could not be reached'}); "
               "run once online to fill the cache")
    elif isinstance(exc, getattr(errors, "HfHubHTTPError", ())) and getattr(exc, "response", None) is not None:
        status = exc.response.status_code
        try:
            phrase = http.HTTPStatus(status).phrase.lower()
        except ValueError:
            phrase = "error"
        server = getattr(exc, "server_message", None) or ""
        msg = f"{what}: {status} {phrase}" + (f" ({server.strip()})" if server.strip() else "")
    else:
        msg = f"{what}: {type(exc).__name__}: {exc}"
    return scrub(msg, token)


# -- resolving -----------------------------------------------------------------
def resolve(ref: ModelRef | str, headers_only: bool = False, *, allow_pickle: bool = False,
            token: str | None = None, progress: bool = True, stream: bool | None = False,
            fetch_options: dict[str, Any] | None = None) -> Resolved:
    """Pin a hub reference to a commit and open it (see the module docstring).

    ``progress=False`` hides huggingface-hub's download bars (``--quiet``); otherwise
    they follow huggingface-hub's own settings (``HF_HUB_DISABLE_PROGRESS_BARS``).

    ``stream``: ``True`` reads the weights over HTTP range requests as they are
    needed (:class:`surgeon.io.remote.StreamingCheckpoint`; nothing stored) unless
    all shards are already cached; ``None`` does so only when they are not cached
    and the cache's disk lacks the room for them; ``False`` downloads them.
    ``fetch_options`` go to :class:`surgeon.io.remote.RangeFetcher` (``retries``,
    ``backoff``, ``cache_bytes``, ``on_progress``).
    """
    if isinstance(ref, str):
        ref = parse_ref(ref)
    if not ref.is_hub or not ref.repo_id:
        raise InvalidInputError(f"{ref}: not a hub reference (expected org/name, org/name@revision or hf://org/name@rev)")
    what = _describe(ref)
    try:
        with _progress_bars(progress):
            return _resolve(ref, headers_only, allow_pickle, token, what, stream, fetch_options or {})
    except (InvalidInputError, StepError) as exc:
        raise type(exc)(scrub(str(exc), token)) from None
    except Exception as exc:  # huggingface-hub, httpx/requests and OS errors
        raise InvalidInputError(_hub_error(exc, what, token)) from None


@contextlib.contextmanager
def _progress_bars(show: bool) -> Iterator[None]:
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    if show or are_progress_bars_disabled():
        yield
        return
    disable_progress_bars()
    try:
        yield
    finally:
        enable_progress_bars()


def _resolve(ref: ModelRef, headers_only: bool, allow_pickle: bool, token: str | None, what: str,
             stream: bool | None = False, fetch_options: dict[str, Any] | None = None) -> Resolved:
    repo_id = ref.repo_id
    assert repo_id is not None
    api = _api(token)
    sha = _resolve_revision(api, repo_id, ref.revision)
    label = what if ref.revision == sha else f"{what} ({sha[:12]})"
    offline = is_offline()
    snapshot = _cache_folder(repo_id) / "snapshots" / sha

    if offline:
        if not snapshot.is_dir():
            raise InvalidInputError(f"{what}: commit {sha[:12]} is not in the local cache and HF_HUB_OFFLINE=1 is set; "
                                    "run once online to fill the cache")
        listing = _cached_listing(repo_id, sha, snapshot)
        sizes: dict[str, int] = {}
    else:
        entries = [f for f in api.list_repo_tree(repo_id, revision=sha, recursive=False)
                   if type(f).__name__ == "RepoFile" and "/" not in f.path]
        listing = sorted(f.path for f in entries)
        sizes = {f.path: int(getattr(f, "size", 0) or 0) for f in entries}

    small = [f for f in SMALL_FILES if f in listing]
    folder = _download(repo_id, sha, small, token, offline, what) if small else snapshot
    index = _read_index(folder / INDEX_NAME, label) if INDEX_NAME in listing else None
    shards = _weight_files(listing, index)
    if not shards:
        pickles = _pickled_weights(listing)
        if not pickles and offline:
            raise InvalidInputError(f"{what}: the weights of commit {sha[:12]} are not in the local cache and "
                                    "HF_HUB_OFFLINE=1 is set; run once online to fill the cache")
        if not pickles:
            raise CheckpointError(f"{label}: no model.safetensors, {INDEX_NAME} or *.safetensors file in the repository")
        if not allow_pickle:
            raise CheckpointError(
                f"{label}: only pickled weights ({', '.join(pickles)}); pickle files can run code when loaded, so "
                "surgeon refuses them by default and never downloads them. Use a revision with safetensors, or pass "
                "--allow-pickle (they are then loaded with torch.load(weights_only=True)).")
        shards = pickles  # opted in: there are no headers to read remotely, so fetch them

    cached = snapshot.is_dir() and all((snapshot / s).is_file() for s in shards)
    remote_ok = not cached and not offline and shards[0].endswith(".safetensors")
    streamed = remote_ok and not headers_only and (stream is True or (stream is None and _lacks_room(
        sum(sizes.get(s, 0) for s in shards if not (snapshot / s).is_file()), what)))
    if remote_ok and (headers_only or streamed):
        from .remote import RangeFetcher, open_remote

        config = _read_json(folder / "config.json", label) if "config.json" in listing else None
        fetcher = RangeFetcher(_range_stream(repo_id, sha, token), label=label, **(fetch_options or {})) \
            if streamed else None
        ck = open_remote(repo_id=repo_id, revision=sha, folder=folder, shards=shards,
                         index=index, config=config, read_range=_range_reader(repo_id, sha, token), label=label,
                         fetcher=fetcher)
        return Resolved(repo_id, ref.revision, sha, folder, ck, headers_only, small)

    files = small + [s for s in shards if s not in small]
    folder = _download(repo_id, sha, files, token, offline, what)
    try:
        ck = Checkpoint.open(folder, allow_pickle=allow_pickle, label=label)
    except CheckpointError as exc:
        if offline:
            raise InvalidInputError(f"{what}: the cached snapshot is incomplete and HF_HUB_OFFLINE=1 is set ({exc})") from None
        raise
    return Resolved(repo_id, ref.revision, sha, folder, ck, False, files)


def _cached_listing(repo_id: str, sha: str, snapshot: Path) -> list[str]:
    """Root files of commit ``sha`` as far as the cache knows: huggingface-hub's cached tree
    listing of the commit when there is one, else the files present in the snapshot folder."""
    try:
        from huggingface_hub._tree_cache import read_tree_cache

        entries = read_tree_cache(str(_cache_folder(repo_id)), sha)
    except Exception:  # an older huggingface-hub without a tree cache
        entries = None
    if entries:
        return sorted(p for p in entries if "/" not in p)
    return sorted(p.name for p in snapshot.iterdir() if p.is_file())


def _resolve_revision(api: Any, repo_id: str, revision: str | None) -> str:
    if revision and re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    if hasattr(api, "resolve_revision"):  # huggingface-hub >= 1.x: falls back on the cache's refs when offline
        r = api.resolve_revision(repo_id, revision=revision, local_files_only=is_offline())
        return str(getattr(r, "resolved", r))
    ref_file = _cache_folder(repo_id) / "refs" / (revision or "main")
    if is_offline() and ref_file.is_file():
        return ref_file.read_text().strip()
    sha = api.model_info(repo_id, revision=revision).sha
    try:
        ref_file.parent.mkdir(parents=True, exist_ok=True)
        ref_file.write_text(sha)
    except OSError:
        pass
    return sha


def _download(repo_id: str, sha: str, files: list[str], token: str | None, offline: bool, what: str) -> Path:
    """Fetch exactly ``files`` of commit ``sha`` into the cache; returns the snapshot folder."""
    from huggingface_hub import snapshot_download

    patterns = [glob.escape(f) for f in files]
    path = snapshot_download(repo_id, revision=sha, allow_patterns=patterns, endpoint=endpoint(), token=token,
                             local_files_only=offline)
    return Path(path)


def _range_reader(repo_id: str, sha: str, token: str | None) -> Any:
    """``read(filename, start, end) -> (bytes, file size)`` over huggingface-hub's HTTP session."""
    from huggingface_hub import constants, get_session, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, hf_raise_for_status

    headers = build_hf_headers(token=token)
    timeout = getattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 10)

    def read(filename: str, start: int, end: int) -> tuple[bytes, int]:
        url = hf_hub_url(repo_id, filename, revision=sha, endpoint=endpoint())
        r = get_session().get(url, headers={**headers, "Range": f"bytes={start}-{end}"}, timeout=timeout)
        hf_raise_for_status(r)
        content = r.content
        m = re.search(r"/(\d+)\s*$", r.headers.get("Content-Range", ""))
        if r.status_code == 206 and m:
            return content, int(m.group(1))
        # the server ignored the range and sent the whole file
        return content[start:] if start else content, len(content)

    return read


def _lacks_room(nbytes: int, what: str) -> bool:
    """Whether huggingface-hub's cache disk has less than ``nbytes`` (+5 %) free; logs why it streams."""
    from huggingface_hub import constants

    where = Path(constants.HF_HUB_CACHE)
    probe = where
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return False
    if free >= nbytes * 1.05:
        return False
    log.warning("%s: its weights (%.1f GB) do not fit the %.1f GB free under %s: streaming them instead of "
                "downloading (--remote-stream)", what, nbytes / 1e9, free / 1e9, where)
    return True


def _range_stream(repo_id: str, sha: str, token: str | None) -> Any:
    """A :data:`surgeon.io.remote.RangeStream` over huggingface-hub's HTTP client.

    Connection drops, timeouts and 408/429/5xx answers raise
    :class:`~surgeon.io.remote.TransientFetchError` (the fetcher retries them);
    other HTTP errors raise at once, scrubbed of the token.
    """
    from huggingface_hub import constants, get_session, hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    from .remote import TransientFetchError

    headers = build_hf_headers(token=token)
    timeout = getattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 10)

    def fetch(filename: str, start: int, end: int, sink: Any) -> None:
        url = hf_hub_url(repo_id, filename, revision=sha, endpoint=endpoint())
        session = get_session()
        try:
            with session.stream("GET", url, headers={**headers, "Range": f"bytes={start}-{end}"}, timeout=timeout,
                                follow_redirects=True) as r:
                if r.status_code in (408, 429) or r.status_code >= 500:
                    raise TransientFetchError(f"HTTP {r.status_code}")
                if r.status_code not in (200, 206):
                    r.read()
                    raise CheckpointError(scrub(f"{repo_id}: {filename}: HTTP {r.status_code} for bytes {start}-{end}: "
                                                f"{r.text[:200]}", token))
                skip = start if r.status_code == 200 else 0  # the server ignored the range: skip to it
                for chunk in r.iter_bytes():
                    if skip:
                        cut = min(skip, len(chunk))
                        chunk, skip = chunk[cut:], skip - cut
                    if chunk:
                        sink(chunk)
        except (CheckpointError, TransientFetchError):
            raise
        except Exception as exc:  # the HTTP client's transport errors: dropped connection, timeout, bad framing
            name = type(exc).__name__
            if any(w in name for w in ("Timeout", "Network", "Connect", "Read", "Protocol", "Transport", "Stream",
                                       "Close", "Incomplete")) or isinstance(exc, OSError):
                raise TransientFetchError(scrub(f"{name}: {exc}", token)) from None
            raise

    return fetch


def _read_json(path: Path, label: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{label}: {path.name} is not valid JSON ({exc})") from None


def _read_index(path: Path, label: str) -> dict[str, str]:
    data = _read_json(path, label)
    wm = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
        raise CheckpointError(f"{label}: {INDEX_NAME} has no valid weight_map")
    return {str(k): v for k, v in wm.items()}


def _pickled_weights(listing: list[str]) -> list[str]:
    """Pickled weight files (``pytorch_model*.bin`` first), never trainer states like ``optimizer.pt``."""
    named = [f for f in listing if fnmatch.fnmatch(f, "pytorch_model*.bin")]
    if named:
        return sorted(named)
    return sorted({f for f in listing for pat in PICKLE_PATTERNS if fnmatch.fnmatch(f, pat)
                   and not NOT_WEIGHTS.fullmatch(f)})


def _weight_files(listing: list[str], index: dict[str, str] | None) -> list[str]:
    """The safetensors files the model uses, chosen like :meth:`Checkpoint.open` chooses them."""
    if index is not None:
        return sorted(set(index.values()))
    if SINGLE_NAME in listing:
        return [SINGLE_NAME]
    return sorted(f for f in listing if f.endswith(".safetensors"))


# -- pushing -------------------------------------------------------------------
def check_push(repo: str, token: str | None = None) -> None:
    """Fail early (before any work) when a push cannot happen: offline, or no token."""
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", repo or ""):
        raise InvalidInputError(f"push: {repo!r} is not a hub repository id (expected org/name)")
    if is_offline():
        raise InvalidInputError(f"push to {repo}: HF_HUB_OFFLINE=1 is set, so nothing can be uploaded "
                                "(unset it, or skip the push with --no-push)")
    if not _known_token(token):
        raise InvalidInputError(f"push to {repo}: no Hugging Face token; set HF_TOKEN (a write token) or run "
                                "`hf auth login`")


def push(folder: str | os.PathLike[str], repo: str, private: bool = False, revision: str | None = None,
         commit_message: str | None = None, token: str | None = None) -> dict[str, Any]:
    """Upload a checkpoint folder to ``repo`` (created if missing); returns ``{url, commit, repo, revision}``.

    With ``revision``, the commit goes to that branch (created from ``main`` if
    missing). Surgeon's marker files are not uploaded. Errors are
    :class:`~surgeon.errors.StepError` (or :class:`InvalidInputError` for a bad
    folder/offline/no token) with the token scrubbed from their text.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InvalidInputError(f"push: {folder}: no such folder")
    if not any(p.is_file() for p in folder.iterdir()):
        raise InvalidInputError(f"push: {folder}: the folder is empty")
    check_push(repo, token)
    token = _known_token(token)
    api = _api(token)
    what = f"push to {repo}" + (f"@{revision}" if revision else "")
    message = commit_message or f"Upload {folder.name} with surgeon"
    try:
        api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo, branch=revision, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo, revision=revision, commit_message=message,
                                 ignore_patterns=list(PUSH_IGNORE))
    except Exception as exc:
        raise StepError(_hub_error(exc, f"{what} failed", token)) from None
    sha = getattr(info, "oid", None)
    url = getattr(info, "commit_url", None) or f"{endpoint()}/{repo}/commit/{sha}"
    log.info("pushed %s to %s (%s)", folder, repo, sha)
    return {"url": scrub(url, token), "commit": sha, "repo": repo, "revision": revision or "main",
            "repo_url": scrub(f"{endpoint()}/{repo}" + (f"/tree/{revision}" if revision else ""), token)}
