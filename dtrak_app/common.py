"""What every page needs: the chosen model and training set, URL state, targets, scores, jobs.

Caching (why each): models and training sets are ``st.cache_resource`` keyed by the model
folder's content hash, so a model that is retrained in place is reloaded, and moving between
targets never reloads or re-featurizes anything; featurizers and kernel decompositions live in
one process-wide :class:`~dtrak_core.attribution.methods.MethodCache`; training features come
from the feature store on disk (computed by ``dtrak_app.prepare``, or by a job the user starts:
``dtrak_app.feature_jobs``); score vectors of every target are kept in a
:class:`~dtrak_app.score_cache.ScoreCache` for reverse lookups.
"""

from __future__ import annotations

import base64
import hmac
import io
import ipaddress
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import streamlit as st
from PIL import Image

from dtrak_app.card import upscale
from dtrak_app.score_cache import ScoreCache, model_hashes, score_context, target_key
from dtrak_app.text import md_escape
from dtrak_app.uploads import TargetError, prepare_upload
from dtrak_core import jobs, paths, registry
from dtrak_core.attribution.featurizer import FeatureSettings
from dtrak_core.attribution.methods import (APP_METHODS, METHODS, FeaturesNotReady, Method,
                                            MethodCache, score_targets, train_features)
from dtrak_core.attribution.dataset_features import feature_status
from dtrak_core.attribution.loading import LoadedModel, load_model, load_training_set
from dtrak_core.conventions import DEFAULT_LAMBDA, DEFAULT_PROJECTION_DIM
from dtrak_core.datasets import DatasetError, ImageFolderDataset
from dtrak_core.evaluation.calibration import Calibration, calibrate
from dtrak_core.evaluation.lds.scores import DEFAULT_GRID, read_results
from dtrak_core.generation import SamplerConfig, generate_to_folder
from dtrak_core.models import ModelError, pipeline_files_hash

GALLERY_SEEDS = tuple(range(16))
DEFAULTS = {"method": "dtrak", "K": 10, "k": 2048, "lambda": DEFAULT_LAMBDA, "target": "gallery", "seed": 0}
K_OPTIONS = (1, 2, 5, 10, 20, 50, 100)
k_OPTIONS = (128, 256, 512, 1024, 2048, 4096, 8192)
TARGET_KINDS = {"gallery": "Generated samples", "seed": "Generate with a seed", "upload": "Upload an image"}
SAMPLER = SamplerConfig()  # DDIM, 50 steps, eta 0: deterministic per seed
VIEW_PX = 128  # proponent tiles (32-px images upscaled 4x, nearest neighbour)


def cache_root() -> Path:
    """Where features, jobs, scores and samples go (``DTRAK_CACHE`` or the repository's cache/)."""
    return paths.cache_dir()


# ----------------------------------------------------------------------------- access

#: The secret a browser must present when the app is served (required beyond loopback).
TOKEN_ENV = "DTRAK_TOKEN"
#: A shorter token is refused: nothing limits how fast a network client can guess.
MIN_TOKEN_CHARS = 16
_GRANTED = "_access_granted"
_TOKEN_INPUT = "_access_token_input"
HOW_TO_TOKEN = ("set it to a long random string, for example "
                "`DTRAK_TOKEN=$(python -c 'import secrets; print(secrets.token_urlsafe(24))')`, restart, and "
                "open the app once with `?token=` and that string in the URL (or type it in)")


def is_loopback(address: str | None) -> bool:
    """Whether a server address option listens on this computer only (None or "" = every interface)."""
    if not address:
        return False
    if address.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def served_beyond_loopback(headers: Mapping[str, str], address: str | None) -> bool:
    """Whether a browser reached this session (its request ``headers``) through a server whose
    ``address`` option listens beyond loopback.

    A headless run (AppTest, the app benchmark) has no HTTP request, hence no headers, and no
    listening server.
    """
    return bool(headers) and not is_loopback(address)


def token_matches(given: str, token: str) -> bool:
    """Constant-time comparison (the time taken does not tell how much of a guess was right)."""
    return hmac.compare_digest(given.encode("utf-8"), token.encode("utf-8"))


def require_access() -> None:
    """Stop this run unless the session may use the app; called first by ``app.py`` and by every page.

    Without ``DTRAK_TOKEN`` the app serves loopback only: served beyond it, it shows why it refuses
    and how to set a token. With ``DTRAK_TOKEN`` every session must present it once, as
    ``?token=...`` (removed from the URL at once, so links and history never carry it) or typed
    into the form; the session then keeps the grant. Pages call it too: on a fresh server,
    Streamlit may run a page of ``pages/`` directly, without ``app.py``, until ``app.py`` has run once.
    """
    keep_shared_state()  # every page calls this first, with or without app.py (see keep_shared_state)
    token = os.environ.get(TOKEN_ENV, "")
    if not token:
        address = st.get_option("server.address")
        if served_beyond_loopback(st.context.headers, address):
            where = md_escape(address or "every interface")
            st.error(f"dtrak refuses to serve: it listens on {where}, beyond this computer, and "
                     f"`{TOKEN_ENV}` is not set. Whoever reaches this address could browse the training images, "
                     f"register models and start jobs. Either listen on 127.0.0.1 only (`make run` without HOST), "
                     f"or {HOW_TO_TOKEN}.")
            st.stop()
        return
    if len(token) < MIN_TOKEN_CHARS:
        st.error(f"`{TOKEN_ENV}` is {len(token)} characters long; at least {MIN_TOKEN_CHARS} are required: "
                 f"{HOW_TO_TOKEN}.")
        st.stop()
    if st.session_state.get(_GRANTED):
        return
    offered, wrong = [], False
    if "token" in st.query_params:
        offered.append(st.query_params["token"])
        del st.query_params["token"]
    if st.session_state.get(_TOKEN_INPUT):
        offered.append(st.session_state[_TOKEN_INPUT])
    for given in offered:
        if token_matches(given, token):
            st.session_state[_GRANTED] = True
            return
        wrong = True
    st.title("dtrak")
    if wrong:
        st.error("That token is not the one this server was started with.")
    with st.form("sign_in"):
        st.text_input("Access token", type="password", key=_TOKEN_INPUT,
                      help=f"the value of {TOKEN_ENV} where the app was started")
        st.form_submit_button("Open")
    st.stop()


# ----------------------------------------------------------------------------- URL state

#: How a URL parameter's expected type reads in a warning.
KIND_NAMES = {int: "a whole number", float: "a number", str: "text"}


def _parse(name: str, text: str, kind: type):
    try:
        return kind(text)
    except (TypeError, ValueError):
        st.warning(f"Ignoring the link's {name}={md_escape(repr(text))}: expected {KIND_NAMES[kind]}.")
        return DEFAULTS[name]


#: Settings every page reads, held in session state under their widgets' keys.
SHARED_STATE = ("model", "method", "target", "seed", "K", "k", "lambda")
#: The app's own copy of the shared settings: a plain session-state entry no widget owns.
_SHARED = "_shared_settings"


def keep_shared_state() -> None:
    """Keep the shared settings alive across pages; called by ``app.py`` at the start of every run,
    and again by :func:`init_state` before a page draws a widget: Streamlit runs a page of
    ``pages/`` without ``app.py`` until ``app.py`` has run once in the server (and in every
    AppTest run after the first). Calling it twice in a run changes nothing.

    A widget owns its session-state key, and Streamlit deletes that key at the end of a run in
    which the widget was not drawn (the run of another page), so the next page that read "k"
    failed with a KeyError. Re-assigning a key to itself no longer keeps it (Streamlit 1.67 files
    the value under the widget's id, which the same clean-up removes). So the app keeps its own
    copy, in an entry no widget owns: each run starts by taking the widgets' latest values into
    it and assigning them back to the widget keys (those Streamlit deleted too) before any widget
    is drawn, so whichever page's widget draws next shows the value.
    """
    own = st.session_state.setdefault(_SHARED, {})
    for name in SHARED_STATE:
        if name in st.session_state:
            own[name] = st.session_state[name]
        if name in own:
            # Assigned in every run: another page's widget of the same key is another widget (another
            # id), which takes its first value from a key assigned in the run, else from its default.
            st.session_state[name] = own[name]


def init_state() -> None:
    """Seed the widgets' session state from the URL once per session (a link reproduces a view);
    first, keep the shared settings (a page may run without app.py: see ``keep_shared_state``)."""
    keep_shared_state()
    if st.session_state.get("_url_loaded"):
        return
    q = st.query_params
    for name, kind in (("method", str), ("target", str), ("seed", int), ("K", int), ("k", int),
                       ("lambda", float)):
        st.session_state[name] = _parse(name, q[name], kind) if name in q else DEFAULTS[name]
    limits = {"seed": (0, 2**31 - 1), "K": (1, 1000), "k": (1, 1 << 20), "lambda": (0.0, float("inf"))}
    for name, (low, high) in limits.items():
        if not low <= st.session_state[name] <= high:
            st.warning(f"Ignoring the link's {name}={st.session_state[name]}: expected {low}..{high}.")
            st.session_state[name] = DEFAULTS[name]
    if st.session_state["method"] not in APP_METHODS:
        st.warning(f"Unknown method {md_escape(repr(st.session_state['method']))} in the link; using D-TRAK.")
        st.session_state["method"] = DEFAULTS["method"]
    if st.session_state["target"] not in TARGET_KINDS:
        st.session_state["target"] = DEFAULTS["target"]
    if "model" in q:
        st.session_state["model"] = q["model"]
    # What the link itself chose: a lambda from a link is the user's (kept, not replaced by the
    # calibration); a link to an uploaded-image view cannot carry the image.
    st.session_state[_LAMBDA_AUTO] = None if _link_lambda_kept(q.get("lambda")) else st.session_state["lambda"]
    st.session_state["_model_from_link"] = "model" in q
    st.session_state["_upload_from_link"] = st.session_state["target"] == "upload"
    st.session_state["_url_loaded"] = True
    # Into the app's own copy now, not at the next run's start: the next run may be a page that
    # draws none of these widgets and runs without app.py (a fresh server), whose end deletes the
    # widget keys; the copy would then never have held them (KeyError 'k' on the page after).
    keep_shared_state()


def _link_lambda_kept(text: str | None) -> bool:
    """Whether the link gave a lambda that was accepted (not replaced by the default after a warning)."""
    try:
        return text is not None and float(text) == float(st.session_state["lambda"])
    except ValueError:
        return False


def sync_url(**extra: object) -> None:
    """Write the current view into the URL.

    lambda is written only when it is the user's: a calibrated lambda is left out, so the link
    gets this model's calibration wherever it is opened (the same value, from the same files).
    """
    state = st.session_state
    params = {"model": state.get("model"), "method": state.get("method"), "K": state.get("K"),
              "k": state.get("k"), "lambda": state.get("lambda") if lambda_is_users() else None,
              "target": state.get("target"), "seed": state.get("seed"), **extra}
    if params["lambda"] is None and "lambda" in st.query_params:
        del st.query_params["lambda"]
    st.query_params.update({k: str(v) for k, v in params.items() if v is not None})


#: Session key of the lambda the app itself last put into the "lambda" widget (the default or a
#: calibration); None when the link set it. A widget value that differs from it is the user's.
_LAMBDA_AUTO = "_lambda_auto"


def lambda_is_users() -> bool:
    """Whether the current lambda was set by the user (in a widget on any page, or by the link)."""
    state = st.session_state
    if "lambda" not in state:
        return False
    return state.get(_LAMBDA_AUTO) is None or float(state["lambda"]) != float(state[_LAMBDA_AUTO])


# ----------------------------------------------------------------------------- resources

@st.cache_resource(show_spinner="Loading the model...", max_entries=4)
def _cached_model(model_dir: str, files_hash: str) -> LoadedModel:
    return load_model(model_dir)


@st.cache_resource(show_spinner="Loading the training images...", max_entries=4)
def _cached_training_set(model_dir: str, files_hash: str, data_dir: str | None,
                         label_column: str = registry.DEFAULT_LABEL_COLUMN) -> ImageFolderDataset:
    dataset = load_training_set(_cached_model(model_dir, files_hash), data_dir, label_column)
    _ = dataset.pixels_and_metadata_hash  # hash once here, not on every rerun
    return dataset


@st.cache_resource
def method_cache() -> MethodCache:
    return MethodCache()


@dataclass
class Context:
    """The chosen model and its training set."""

    entry: registry.ModelEntry
    model: LoadedModel
    train: ImageFolderDataset
    files_hash: str

    @property
    def size(self) -> int:
        return self.model.sample_size


def _register_form() -> None:
    with st.sidebar.expander("Register a model"):
        with st.form("register", clear_on_submit=False):
            name = st.text_input("Name", key="reg_name")
            model_dir = st.text_input("Pipeline folder (diffusers DDPMPipeline)", key="reg_model")
            data_dir = st.text_input("Training image folder", key="reg_data")
            label_column = st.text_input(
                "Label column (optional)", key="reg_label", placeholder=registry.DEFAULT_LABEL_COLUMN,
                help="the column of the folder's metadata.csv that names each image's artist, style or source: "
                     f"the artist chart groups by it (blank: '{registry.DEFAULT_LABEL_COLUMN}' when there is one)")
            replace = st.checkbox("Replace the model registered under this name", key="reg_replace")
            st.caption("Folders must be under the project's models/ or cache folder, or a folder listed in "
                       f"{registry.ROOTS_ENV} where the app was started.")
            if st.form_submit_button("Register"):
                try:
                    entry = registry.register_model(name, model_dir, data_dir, cache_root(), replace=replace,
                                                    label_column=label_column)
                except (ModelError, DatasetError, ValueError) as error:
                    st.error(f"Not registered: {md_escape(error)}")
                else:
                    st.success(f"Registered {md_escape(entry.name)}.")
                    st.session_state["model"] = entry.name


def model_context() -> Context | None:
    """Sidebar model picker (+ registration); the loaded model and training set, or None after an error."""
    init_state()
    _register_form()  # first: a model registered by this run is then listed (and chosen) below
    try:
        entries = registry.list_models(cache_root())
    except ValueError as error:
        st.error(md_escape(error))
        return None
    if not entries:
        st.info("No model yet. Train the demo with `make demo-model`, or register a pipeline folder and "
                "its training images in the sidebar.")
        return None
    names = [e.name for e in entries]
    if st.session_state.get("model") not in names:
        if st.session_state.get("model"):
            st.warning(f"Model {md_escape(repr(st.session_state['model']))} from the link is not registered "
                       f"here; showing {md_escape(names[0])}.")
        st.session_state["model"] = names[0]
    st.sidebar.selectbox("Model", names, key="model")
    entry = entries[names.index(st.session_state["model"])]
    try:
        files_hash = pipeline_files_hash(entry.model_dir)
    except (FileNotFoundError, ModelError):  # no folder, not a pipeline (ModelError), missing weights
        try:
            load_model(entry.model_dir)  # says precisely what is wrong (no folder, not a pipeline, type)
        except ModelError as error:
            st.error(f"Model {md_escape(entry.name)}: {md_escape(error)}")
            return None
        st.error(f"Model {md_escape(entry.name)}: {md_escape(entry.model_dir)} has no UNet weights "
                 "(unet/diffusion_pytorch_model.safetensors); expected a saved DDPMPipeline.")
        return None
    try:
        model = _cached_model(entry.model_dir, files_hash)
        train = _cached_training_set(entry.model_dir, files_hash, entry.data_dir, entry.labels_from)
    except (ModelError, DatasetError, ValueError) as error:
        st.error(f"Model {md_escape(entry.name)}: {md_escape(error)}")
        return None
    st.sidebar.caption(f"{len(train)} training images, {train.image_size}x{train.image_size} px; "
                       f"weights {files_hash[:10]}")
    return Context(entry, model, train, files_hash)


@dataclass(frozen=True)
class MeasuredLds:
    """The LDS an LDS build of this model measured for a method (on ``kind`` targets): mean and
    95% bootstrap CI as fractions, at the build's tuned ``lam`` (None: the method has none)."""

    entry: str
    label: str
    kind: str
    mean: float
    ci_low: float
    ci_high: float
    lam: float | None
    num_targets: int
    build: str


def lds_build_folders() -> list[Path]:
    """The LDS builds the app knows: ``DTRAK_LDS_DIR`` (the Benchmark page's), then benchmarks/lds/*."""
    folders = [Path(os.environ["DTRAK_LDS_DIR"])] if os.environ.get("DTRAK_LDS_DIR") else []
    folders += sorted(path.parent for path in (paths.REPO_ROOT / "benchmarks" / "lds").glob("*/lds.json"))
    return list(dict.fromkeys(folders))


def lds_entry_for(method: str, K: int) -> str | None:
    """The LDS grid's entry of a method with its own output function at K timesteps (any K for a
    method without features), if the grid has one."""
    for entry in DEFAULT_GRID:
        if (entry.method == method and entry.output_fn is None and entry.models == "full"
                and entry.num_timesteps in (None, K)):
            return entry.name
    return None


@st.cache_data(max_entries=64)
def _measured_lds(files_hash: str, entry: str, builds: tuple[tuple[str, float], ...]) -> MeasuredLds | None:
    """``builds``: (folder, mtime of its results) pairs; the mtimes renew the cache."""
    for folder, _ in builds:
        try:
            if json.loads((Path(folder) / "lds.json").read_text()).get("model_hash") != files_hash:
                continue
            results = read_results(folder)  # verified against its checksum
        except (OSError, ValueError):  # no results yet, or damaged: nothing to quote from this build
            continue
        record = results.get("entries", {}).get(entry, {})
        for kind in ("validation", "generated"):
            measured = record.get("kinds", {}).get(kind, {})
            if measured.get("status") == "measured":
                return MeasuredLds(entry, record.get("label", entry), kind, float(measured["mean"]),
                                   float(measured["ci_low"]), float(measured["ci_high"]),
                                   None if measured.get("lambda") is None else float(measured["lambda"]),
                                   int(measured.get("num_targets", 0)), Path(folder).name)
    return None


def measured_lds(ctx: Context, method: str, K: int) -> MeasuredLds | None:
    """The measured LDS of ``method`` (at K) on this model from a stored LDS build, or None."""
    entry = lds_entry_for(method, K)
    if entry is None:
        return None
    stamps = []
    for folder in lds_build_folders():
        results = folder / "results" / "lds.json"
        stamps.append((str(folder), results.stat().st_mtime if results.exists() else 0.0))
    return _measured_lds(ctx.files_hash, entry, tuple(stamps))


# ----------------------------------------------------------------------------- targets

@dataclass
class Target:
    """A target image (uint8 (H, W, 3)), how to name it, and its seed if generated."""

    image: np.ndarray
    label: str
    seed: int | None = None
    note: str = ""

    @property
    def key(self) -> str:
        return target_key(self.image)


@st.cache_data(show_spinner="Sampling (DDIM, 50 steps)...", max_entries=64)
def samples(model_dir: str, files_hash: str, seeds: tuple[int, ...]) -> list[np.ndarray]:
    """Generated images of ``seeds`` (uint8 (H, W, 3) each), kept on disk under the cache."""
    folder = cache_root() / "samples" / files_hash[:16] / SAMPLER.tag
    generate_to_folder(model_dir, seeds, SAMPLER, folder, progress=False)
    return [np.asarray(Image.open(folder / f"{s}.png").convert("RGB")) for s in seeds]


def pixel_image_url(image: np.ndarray, side: int) -> str:
    """An (H, W, 3) uint8 image upscaled by an integer factor to about ``side`` px (nearest
    neighbour: crisp pixels, no blur), as an inline ``data:image/png;base64,...`` URL for st.image.

    Inline, because st.image otherwise serves the picture from Streamlit's media files, and a
    run that is interrupted by a rerun deletes the files of the previous run that it had not
    reached yet: a tile the browser had not fetched by then stays a broken image, since the next
    run sends the same URL and the browser does not ask again. The tiles are a few KB each.
    """
    buffer = io.BytesIO()
    upscale(image, side).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _pick_seed(seed: int) -> None:
    st.session_state["seed"] = seed
    st.session_state["target"] = "gallery"


def pick_target(ctx: Context, gallery_columns: int = 8) -> Target | None:
    """Target chooser: the gallery of samples, a seed to generate, or an upload."""
    kind = st.radio("Target", list(TARGET_KINDS), format_func=TARGET_KINDS.get, key="target", horizontal=True)
    if kind == "upload":
        upload = st.file_uploader("An image (PNG, JPEG, GIF, WebP; up to 10 MiB)", key="upload")
        if upload is None:
            if st.session_state.get("_upload_from_link"):
                st.info("This link was to a view of an uploaded image, and a link cannot carry the image itself: "
                        "upload the image again to see it.")
            else:
                st.info("Upload an image to attribute it.")
            return None
        st.session_state["_upload_from_link"] = False
        try:
            prepared = prepare_upload(upload.getvalue(), ctx.size, upload.name)
        except TargetError as error:
            st.error(md_escape(error))
            return None
        return Target(prepared.image, f"upload {upload.name}", None, prepared.note)
    if kind == "seed":
        st.number_input("Seed", min_value=0, max_value=2**31 - 1, step=1, key="seed")
    else:
        images = samples(ctx.entry.model_dir, ctx.files_hash, GALLERY_SEEDS)
        with st.expander("Generated samples (click a seed)", expanded=True):
            columns = st.columns(gallery_columns)
            for i, (seed, image) in enumerate(zip(GALLERY_SEEDS, images)):
                with columns[i % gallery_columns]:
                    st.image(pixel_image_url(image, 64))
                    st.button(f"seed {seed}", key=f"pick_{seed}", on_click=_pick_seed, args=(seed,),
                              type="primary" if seed == st.session_state["seed"] else "secondary")
    seed = int(st.session_state["seed"])
    image = samples(ctx.entry.model_dir, ctx.files_hash, (seed,))[0]
    return Target(image, f"seed {seed}", seed, f"DDIM 50 steps, eta 0, seed {seed}")


# ----------------------------------------------------------------------------- methods and scores

#: How the method menu names each method: the baselines say what they are for.
METHOD_MENU = {"pixel": "raw pixel similarity (a baseline)", "random": "random (a sanity check, not a result)"}


def method_menu_label(name: str) -> str:
    return METHOD_MENU.get(name, METHODS[name].label)


#: How an export names where a calibrated lambda came from (``Calibration.source``).
CALIBRATION_SOURCES = {"lds": "calibrated on an LDS build", "self-retrieval": "calibrated by self-retrieval"}


@dataclass(frozen=True)
class Settings:
    """The method and its settings as used, and where lambda came from.

    ``lambda_source``: "calibrated" (``calibration`` says how), "user" (a widget or the link),
    or "default" (the constant, while the calibration waits for the training features).
    """

    method: str
    K: int
    k: int
    lam: float
    lambda_source: str
    calibration: Calibration | None

    def lambda_note(self) -> str:
        """One line (Markdown) on where lambda came from."""
        if self.lambda_source == "calibrated" and self.calibration is not None:
            return f"**Calibrated for this model.** {md_escape(self.calibration.detail)}"
        if self.lambda_source == "user":
            mine = f"lambda {self.lam:g}: set by you"
            if self.calibration is not None:
                return f"{mine} (the calibrated value for this model is {self.calibration.lam:g})"
            return mine
        return f"lambda {self.lam:g}: the default, until this model's training features are ready to calibrate it"

    def record(self, method: str | None = None) -> dict[str, object]:
        """What an export records about the settings of ``method`` (default: this one): K and k only
        for a method that reads gradient features, lambda and its source only for one that uses it."""
        spec = METHODS[method or self.method]
        source = None
        if spec.uses_lambda:
            source = (CALIBRATION_SOURCES.get(self.calibration.source, f"calibrated ({self.calibration.source})")
                      if self.lambda_source == "calibrated" and self.calibration is not None else
                      "set by the user" if self.lambda_source == "user" else "default, not calibrated")
        return {"method": spec.label, "K": self.K if spec.needs_features else None,
                "k": self.k if spec.needs_features else None, "lambda": self.lam if spec.uses_lambda else None,
                "lambda_source": source}


def lds_default_settings(method: str, K: int, k: int) -> bool:
    """Whether (method, K, k) are settings an LDS build measures (its grid's entries of the method with
    its own output function at the default projection), so a build's tuned lambda applies."""
    measured = {e.num_timesteps for e in DEFAULT_GRID if e.method == method and e.output_fn is None
                and e.models == "full"}
    return K in measured and k == DEFAULT_PROJECTION_DIM


def lds_builds_root() -> Path | None:
    """Where calibration looks for LDS builds: beside the app's build (``DTRAK_LDS_DIR``) when set,
    else the repository's benchmarks/lds (None: calibrate's default)."""
    folder = os.environ.get("DTRAK_LDS_DIR")
    return Path(folder).parent if folder else None


@st.cache_data(show_spinner="Calibrating lambda for this model...", max_entries=64)
def _calibration(model_dir: str, files_hash: str, data_dir: str | None, label_column: str, method_name: str,
                 K: int, k: int, features_key: str, cache: str, builds_root: str | None) -> Calibration:
    """calibrate() of finished training features (``features_key`` and ``cache`` key the result)."""
    model = _cached_model(model_dir, files_hash)
    train = _cached_training_set(model_dir, files_hash, data_dir, label_column)
    method = METHODS[method_name]
    features = train_features(model, train, feature_settings(method, K, k), Path(cache) / "features",
                              compute_missing=False, cache=method_cache())
    return calibrate(features, method_name, files_hash, lds_default_settings(method_name, K, k),
                     kernel=method_cache().kernel(features), cache_root=cache, builds_root=builds_root)


def calibration_for(ctx: Context, method_name: str, K: int, k: int) -> Calibration | None:
    """This model's calibrated lambda for a kernel method, or None: the method uses no lambda or
    reads no features, or its training features are not ready (nothing is computed for it here)."""
    method = METHODS[method_name]
    if not (method.uses_lambda and method.needs_features):
        return None
    root = cache_root()
    try:
        status = feature_status(ctx.model, ctx.train, feature_settings(method, K, k), root / "features")
        if status.state != "complete":
            return None
        builds = lds_builds_root()
        return _calibration(ctx.entry.model_dir, ctx.files_hash, ctx.entry.data_dir, ctx.entry.labels_from,
                            method_name, K, k, status.key, str(root), None if builds is None else str(builds))
    except (FeaturesNotReady, OSError, ValueError) as error:  # vanished features, an unwritable cache
        st.caption(f"lambda could not be calibrated: {md_escape(error)}")
        return None


def effective_lambda(ctx: Context, method_name: str, K: int, k: int) -> float:
    """The lambda to score ``method_name`` with on a page that shows no lambda widget of its own
    (or several methods at once): the user's when they set one, else this method's calibration,
    else the default."""
    if lambda_is_users():
        return float(st.session_state["lambda"])
    calibration = calibration_for(ctx, method_name, K, k)
    return calibration.lam if calibration is not None else DEFAULT_LAMBDA


def _reset_lambda(value: float) -> None:
    st.session_state["lambda"] = value
    st.session_state[_LAMBDA_AUTO] = value


def method_settings(ctx: Context) -> Settings:
    """The "Advanced" panel: method, K timesteps, projection size k and lambda, each with one line
    on what it does; lambda defaults to this model's calibration (see :func:`calibration_for`).

    A lambda the user set (here, on another page, or in the link) is kept and marked as theirs,
    with a button back to the calibrated value; otherwise lambda follows the calibration of the
    model, method and settings in view.
    """
    state = st.session_state
    with st.expander("Advanced: method, K, k, lambda"):
        method = st.selectbox("Method", APP_METHODS, key="method", format_func=method_menu_label)
        st.caption("How the scores are computed. D-TRAK is the paper's best; raw pixel similarity knows nothing "
                   "of the model; random is a sanity check that any real method must beat.")
        spec = METHODS[method]
        cols = st.columns(3)
        cols[0].number_input("K timesteps", min_value=1, max_value=1000, step=1, key="K",
                             disabled=not spec.needs_features)
        cols[0].caption("Noise levels each gradient is averaged over: more is steadier and slower (10: quick, "
                        "100: better).")
        cols[1].selectbox("Projection size k", sorted(set(k_OPTIONS) | {int(state["k"])}), key="k",
                          disabled=not spec.needs_features)
        cols[1].caption("Numbers kept per image from its gradient: more keeps more detail and takes more memory.")
        K, k = int(state["K"]), int(state["k"])
        calibration = calibration_for(ctx, method, K, k)
        users = lambda_is_users()
        # Before the widget is drawn, so that it shows the value: the calibration, or the default
        # while there is none (not the calibration of the method or settings viewed before).
        automatic = calibration.lam if calibration is not None else DEFAULT_LAMBDA
        if not users and float(state["lambda"]) != automatic:
            _reset_lambda(automatic)
        cols[2].number_input("lambda", min_value=0.0, format="%.6g", key="lambda", disabled=not spec.uses_lambda)
        cols[2].caption("Ridge regularisation: small treats each training image as distinct, large lets images "
                        "with large gradients dominate.")
        source = "user" if users else "calibrated" if calibration is not None else "default"
        settings = Settings(method, K, k, float(state["lambda"]), source, calibration)
        if spec.uses_lambda:
            st.caption(settings.lambda_note())
            if users and calibration is not None:
                st.button(f"Reset to calibrated ({calibration.lam:g})", key="lambda_reset", on_click=_reset_lambda,
                          args=(calibration.lam,))
    return settings


def feature_settings(method: Method, K: int, k: int) -> FeatureSettings:
    return FeatureSettings(output_fn=method.output_fn or "square", num_timesteps=K, projection_dim=k)


def score_cache(ctx: Context, method: Method, settings: FeatureSettings | None, lam: float) -> ScoreCache:
    # The rule declares what its scores depend on (feature settings, lambda); the rest stays out of the key.
    lam_used = lam if "lambda" in method.key_fields else float("nan")
    fields = settings.key_fields() if settings is not None and "features" in method.key_fields else None
    return ScoreCache(cache_root() / "scores", score_context(model_hashes(ctx.model), ctx.train.pixels_and_metadata_hash,
                                                             method.name, fields, lam_used))


def scores_for(ctx: Context, target: Target, method_name: str, K: int, k: int, lam: float) -> np.ndarray:
    """One target's scores (n,) under a method; raises FeaturesNotReady while features compute."""
    method = METHODS[method_name]
    settings = feature_settings(method, K, k) if method.needs_features else None
    store = score_cache(ctx, method, settings, lam)
    cached = store.get(target.key)
    if cached is not None and len(cached) == len(ctx.train):
        return cached
    matrices = score_targets(method, [ctx.model], ctx.train, target.image[None], settings, [lam],
                             cache_root() / "features", progress=False, compute_missing=False,
                             cache=method_cache())
    scores = next(iter(matrices.values()))[0]
    store.put(target.key, scores, target.image, {"label": target.label, "seed": target.seed})
    return scores


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "estimating..."
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def show_job(job: jobs.Job, root: Path | None = None) -> None:
    """Progress bar, ETA and state of one job (its place in the queue while queued; ``root``: the
    jobs folder, default the cache's). Feature jobs: ``dtrak_app.feature_jobs``."""
    fraction = job.fraction or 0.0
    done, total = job.progress.get("done"), job.progress.get("total")
    text = f"{job.description}: {job.state}"
    if job.state == "queued":
        position = jobs.queue_position(job, root if root is not None else cache_root() / "jobs")
        if position is not None:
            text += f", position {position} in the queue"
    if total:
        text += f", {done} of {total} images"
    if job.state == "running":
        text += f", ETA {format_seconds(job.eta_seconds)}"
    st.progress(fraction if job.state != "done" else 1.0, text=md_escape(text))
    if job.state == "failed":
        st.error(f"The job failed: {md_escape(job.message)}")
        st.code(job.log_tail(5) or "(no output)")
