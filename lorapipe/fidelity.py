"""Is model B the same model as model A? Teacher-forced per-token KL and top-1 agreement,
held-out loss, and agreement of short greedy answers, on held-out chat rows.

    python -m stages.merge ...      # trained vs merged (the merge gate)
    python -m stages.quantize ...   # merged vs quantized

Per token t of a row (every real token, padding excluded):
    KL_t = sum_v p_A(v | <t) * (log p_A(v | <t) - log p_B(v | <t))     (nats; 0 = identical)
kl_mean averages KL_t over all tokens of all rows, kl_max is the worst token; top1_agree is
the share of tokens where argmax p_A == argmax p_B. loss is the mean NLL of the next token
(all tokens of the chat-formatted row, the same tokens for both models).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm


def load_rows(path: str | Path, n: int) -> list[dict]:
    """The first n rows of a filtered JSONL ({"messages": [{"role", "content"}, ...], ...})."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if len(rows) == n:
                break
            row = json.loads(line)
            if not any(m["role"] == "assistant" for m in row["messages"]):
                raise ValueError(f"{path}: row {len(rows) + 1} has no assistant turn; "
                                 "held-out rows come from the filter stage")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no rows; rerun `dvc repro filter`")
    return rows


def _ids(tok, messages: list[dict], generation_prompt: bool) -> list[int]:
    text = tok.apply_chat_template(messages, tokenize=False,
                                   add_generation_prompt=generation_prompt)
    return tok(text, add_special_tokens=False)["input_ids"]


def encode(tok, rows: list[dict], max_tokens: int) -> list[list[int]]:
    """Whole conversations, chat template applied, cut to their first max_tokens tokens."""
    return [_ids(tok, r["messages"], False)[:max_tokens] for r in rows]


def prompts(tok, rows: list[dict], max_tokens: int) -> list[list[int]]:
    """Each row up to (not including) its last assistant turn + the generation prompt,
    keeping the last max_tokens tokens (the question end is what the answer depends on)."""
    out = []
    for r in rows:
        last = max(i for i, m in enumerate(r["messages"]) if m["role"] == "assistant")
        out.append(_ids(tok, r["messages"][:last], True)[-max_tokens:])
    return out


def _pad(seqs: list[list[int]], pad_id: int, left: bool):
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, sl], mask[i, sl] = torch.tensor(s), 1
    return ids, mask


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _logits(model, ids, mask, device) -> torch.Tensor:
    """fp32 logits on `device`, whichever device the model is on."""
    dev = _device(model)
    return model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.float().to(device)


@torch.no_grad()
def compare(model_a, model_b, seqs: list[list[int]], batch: int, pad_id: int) -> dict:
    """Teacher-forced agreement of B with A, plus each model's held-out loss (module doc)."""
    kl_sum = kl_max = agree = tokens = 0.0
    nll_a = nll_b = predicted = 0.0
    for i in tqdm(range(0, len(seqs), batch), unit="batch", desc="fidelity"):
        ids, mask = _pad(seqs[i:i + batch], pad_id, left=False)
        ids, mask = ids.to(_device(model_a)), mask.to(_device(model_a))  # compare on A's device
        la = F.log_softmax(_logits(model_a, ids, mask, ids.device), -1)
        lb = F.log_softmax(_logits(model_b, ids, mask, ids.device), -1)
        real = mask.bool()
        kl = (la.exp() * (la - lb)).sum(-1)[real].clamp_min(0)  # [tokens]; < 0 is rounding
        kl_sum += kl.sum().item()
        kl_max = max(kl_max, kl.max().item())
        agree += (la.argmax(-1) == lb.argmax(-1))[real].sum().item()
        tokens += real.sum().item()
        nxt, has_next = ids[:, 1:].unsqueeze(-1), real[:, 1:]  # position t predicts t+1
        nll_a -= la[:, :-1].gather(-1, nxt).squeeze(-1)[has_next].sum().item()
        nll_b -= lb[:, :-1].gather(-1, nxt).squeeze(-1)[has_next].sum().item()
        predicted += has_next.sum().item()
        del la, lb
    return {"kl_mean": kl_sum / tokens, "kl_max": kl_max, "top1_agree": agree / tokens,
            "loss_a": nll_a / predicted, "loss_b": nll_b / predicted, "tokens": int(tokens)}


@torch.no_grad()
def greedy(model, tok, prompt_ids: list[list[int]], max_new_tokens: int, batch: int) -> list[str]:
    """Greedy answers (left-padded batches, KV cache), decoded without special tokens."""
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    answers = []
    for i in tqdm(range(0, len(prompt_ids), batch), unit="batch", desc="greedy answers"):
        ids, mask = _pad(prompt_ids[i:i + batch], pad_id, left=True)
        ids, mask = ids.to(_device(model)), mask.to(_device(model))
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad_id, use_cache=True)
        answers += tok.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
    return [a.strip() for a in answers]


def answer_agree(a: list[str], b: list[str]) -> float:
    """Share of prompts whose greedy answers are the same text."""
    assert len(a) == len(b) and a, "answers of both models, same prompts"
    return sum(x == y for x, y in zip(a, b)) / len(a)
