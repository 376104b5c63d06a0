"""A checkpoint as something that scores text: loading, and the batched forward passes.

Loading (:func:`load_checkpoint`) accepts the train stage's checkpoints (DCP folders, read with
:mod:`stages.model.checkpoint`'s safe reader) and its Hugging Face exports (``config.json`` +
``model.safetensors``, converted by :mod:`stages.model.hf`), local or ``s3://``. Anything else --
a missing file, truncated shards, an unknown architecture, a vocabulary smaller than the
tokenizer's -- fails with a :class:`CheckpointError` that names the checkpoint.

Scoring (:class:`Scorer`) is where the speed comes from:

* requests are tokenized in one ``encode_batch`` call, then sorted by length and packed into
  batches of at most ``batch_tokens`` tokens, so padding stays small;
* the choices of one question share one forward pass: the context is laid out once and every
  choice's continuation follows it with its own positions and an attention mask that lets it
  see only the context and itself (a prefix tree). When every continuation is a single token
  (MMLU's " A" .. " D") this is one plain causal pass over the context;
* the output head (the largest matmul of a small model: positions x vocabulary) runs only at the
  positions that are scored, never over the whole context.

Every pass is the model's own ``forward`` (positions, mask and ``return_hidden`` are its
arguments) and its own output head (:meth:`~stages.model.transformer.Transformer.logits`).

The results are lm-eval's: the context is ``encode(context)``, a continuation is what
``encode(context + continuation)`` has beyond it, trailing whitespace of the context moves into
the continuation, an empty context becomes the BOS (else EOS) token, and an over-long request
keeps its last ``max_len + 1`` tokens.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from stages.model.hf import ARCHITECTURES, PICKLE_WEIGHTS, from_hf, pickle_weights_refusal
from stages.model.transformer import Transformer


class CheckpointError(RuntimeError):
    pass


try:
    from torch.distributed.checkpoint.api import CheckpointException as _DCPException
except ImportError:  # pragma: no cover
    _DCPException = Exception


# -- loading -------------------------------------------------------------------------------------------

@dataclass
class LoadedModel:
    model: torch.nn.Module  # a Transformer, or a ForeignModel
    uri: str
    kind: str  # "dcp" | "huggingface"
    step: Optional[int]
    tokens_seen: Optional[int]


def _local_copy(uri: str, storage: Any) -> tuple[str, Optional[str]]:
    """A local folder with the checkpoint's files (a download for s3://), and the temp dir to remove."""
    from pipeline import storage as st

    if not st.is_remote(uri):
        path = uri[len("file://"):] if uri.startswith("file://") else uri
        if not os.path.isdir(path):
            raise CheckpointError(f"checkpoint {uri}: no such folder")
        return path, None
    storage = storage or st.Storage()
    tmp = tempfile.mkdtemp(prefix="lmpipe-eval-ckpt-")
    files = storage.find_files(uri)
    if not files:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"checkpoint {uri}: no files there")
    prefix = uri.rstrip("/") + "/"
    for f in files:
        rel = f[len(prefix):] if f.startswith(prefix) else os.path.basename(f)
        target = os.path.join(tmp, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb") as out:
            out.write(storage.read_bytes(f))
    return tmp, tmp


@dataclass(frozen=True)
class ForeignShape:
    vocab_size: int
    max_seq_len: int


class ForeignModel(torch.nn.Module):
    """A Hugging Face causal LM of an architecture lmpipe does not train (a baseline: Pythia, OPT,
    GPT-2, ...), run by ``transformers`` itself. It offers the plain ``model(tokens) -> logits``
    call the scorer uses when it cannot use the fast path of lmpipe's own model (shared contexts,
    the output head only where scored)."""

    def __init__(self, hf_model, config: dict[str, Any]):
        super().__init__()
        self.hf = hf_model
        window = next((int(config[k]) for k in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")
                       if config.get(k)), 2048)
        self.cfg = ForeignShape(int(hf_model.get_output_embeddings().weight.shape[0]), window)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # right padding needs no attention mask in a causal model: a real token never attends to it
        return self.hf(input_ids=tokens, use_cache=False).logits


def _load_hf(path: str, name: str, runtime: str = "lmpipe") -> torch.nn.Module:
    """lmpipe's architectures into its own model (the fast scoring path), unless ``runtime`` is
    ``transformers``; any other causal LM through ``transformers``. Weights from safetensors only:
    never a pickle."""
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    arch = (config.get("architectures") or ["?"])[0]
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):  # sharded, as lmpipe's export and save_pretrained write large models
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        if any(os.path.basename(s) != s for s in shards):
            raise CheckpointError(f"{index}: names a weights file outside the folder")
        refusal = pickle_weights_refusal(name, shards)
        if refusal:  # before transformers sees it: its own advice is to turn weights_only off
            raise CheckpointError(refusal)
    else:
        shards = ["model.safetensors"] if os.path.exists(os.path.join(path, "model.safetensors")) else []
    if arch in ARCHITECTURES and shards and runtime == "lmpipe":
        from safetensors.torch import load_file

        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(os.path.join(path, shard)))
        return from_hf(config, state)
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise CheckpointError(f"{path}: a {arch} model needs transformers (pip install 'lmpipe[eval]')") from None
    return ForeignModel(AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, torch_dtype=torch.float32), config)


def checkpoint_kind(path: str) -> Optional[str]:
    from stages.model.checkpoint import DCP_METADATA, MODEL_CONFIG

    if os.path.exists(os.path.join(path, MODEL_CONFIG)) and os.path.exists(os.path.join(path, DCP_METADATA)):
        return "dcp"
    weights = ("model.safetensors", "model.safetensors.index.json")
    if os.path.exists(os.path.join(path, "config.json")) and any(os.path.exists(os.path.join(path, w)) for w in weights):
        return "huggingface"
    return None


HF_RUNTIMES = ("lmpipe", "transformers")


def load_checkpoint(uri: str, storage: Any = None, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu", vocab_size: Optional[int] = None, hf_runtime: str = "lmpipe") -> LoadedModel:
    """Load a checkpoint for evaluation; every failure is a :class:`CheckpointError` naming ``uri``.
    ``hf_runtime``: what runs a Hugging Face export of an architecture lmpipe trains -- lmpipe's
    own model (``lmpipe``, the fast path) or ``transformers`` (a check that the export computes
    what was trained); other architectures always run in ``transformers``."""
    if hf_runtime not in HF_RUNTIMES:
        raise ValueError(f"hf_runtime {hf_runtime!r}: one of {HF_RUNTIMES}")
    local, tmp = _local_copy(uri, storage)
    try:
        kind = checkpoint_kind(local)
        pickles = [w for w in PICKLE_WEIGHTS if os.path.exists(os.path.join(local, w))]
        if kind is None and pickles and os.path.exists(os.path.join(local, "config.json")):
            raise CheckpointError(pickle_weights_refusal(uri, pickles))
        if kind is None:
            raise CheckpointError(
                f"checkpoint {uri}: not a checkpoint lmpipe can read (expected a train-stage checkpoint with "
                f"model_config.json + .metadata, or a Hugging Face export with config.json + model.safetensors); "
                f"found {sorted(os.listdir(local))[:10]}"
            )
        step = tokens_seen = None
        try:
            if kind == "dcp":
                from stages.model.checkpoint import extra_name, load_extra, load_full_model

                model = load_full_model(local)
                if os.path.exists(os.path.join(local, extra_name(0))):
                    extra = load_extra(local, 0)
                    step, tokens_seen = int(extra.get("step", 0)), int(extra.get("tokens_seen", 0))
            else:
                model = _load_hf(local, uri, hf_runtime)
        except CheckpointError:
            raise
        except (Exception, _DCPException) as e:  # DCP (a BaseException), safetensors and torch raise their own types
            raise CheckpointError(f"checkpoint {uri} ({kind}) is corrupt or incompatible: {type(e).__name__}: {e}") from e
        if vocab_size is not None and vocab_size > model.cfg.vocab_size:
            raise CheckpointError(
                f"checkpoint {uri}: its vocabulary has {model.cfg.vocab_size} entries but the tokenizer has {vocab_size}: "
                "it was not trained with this tokenizer"
            )
        for p in model.parameters():
            if not torch.isfinite(p).all():
                raise CheckpointError(f"checkpoint {uri}: holds non-finite weights")
        model = model.to(device=device, dtype=dtype).eval()
        return LoadedModel(model, uri, kind, step, tokens_seen)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


# -- requests as token rows ----------------------------------------------------------------------------

@dataclass
class Row:
    """One sequence fed to the model: ``tokens``, their ``positions``, and for tree rows the
    segment each token belongs to (-1 = shared context). ``targets`` lists, per scored request,
    (request index, [(row position, target token), ...])."""

    tokens: list[int]
    positions: Optional[list[int]]
    segments: Optional[list[int]]
    targets: list[tuple[int, list[tuple[int, int]]]]


def encode_pairs(tokenizer, contexts: Sequence[str], continuations: Sequence[Sequence[str]], prefix_token: int,
                 add_special_tokens: bool = True) -> list[tuple[list[int], list[list[int]]]]:
    """lm-eval's ``_encode_pair`` for every (context, its continuations), in two ``encode_batch`` calls."""
    ctx_texts, whole_texts, split, moved_texts = [], [], [], []
    for ctx, conts in zip(contexts, continuations):
        n_spaces = len(ctx) - len(ctx.rstrip())
        moved = ctx[len(ctx) - n_spaces:] if n_spaces else ""
        base = ctx[: len(ctx) - n_spaces]
        ctx_texts.append(base)
        moved_texts.append(moved)
        split.append(len(conts))
        whole_texts.extend(base + moved + c for c in conts)
    ctx_enc = [e.ids for e in tokenizer.encode_batch(ctx_texts, add_special_tokens=add_special_tokens)]
    whole_enc = [e.ids for e in tokenizer.encode_batch(whole_texts, add_special_tokens=add_special_tokens)]
    out, i = [], 0
    for c_ids, n, base, moved, conts in zip(ctx_enc, split, ctx_texts, moved_texts, continuations):
        wholes = whole_enc[i : i + n]
        i += n
        if base == "":  # lm-eval: an empty context is the prefix token (BOS, else EOS)
            out.append(([prefix_token], [list(tokenizer.encode(moved + c, add_special_tokens=False).ids) for c in conts]))
            continue
        out.append((list(c_ids), [list(w[len(c_ids):]) for w in wholes]))
    return out


def plan_rows(ctx: list[int], conts: list[list[int]], max_len: int, share: bool, first_request: int) -> list[Row]:
    """The rows scoring one example's choices: one shared row when possible, else one per choice."""
    for c in conts:
        if not c:
            raise ValueError("a continuation encodes to no tokens")
    fits = all(len(ctx) + len(c) <= max_len + 1 for c in conts)
    if all(len(c) == 1 for c in conts):  # MMLU: one causal pass over the (left-truncated) context
        used = list(ctx[-max_len:])
        return [Row(used, None, None, [(first_request + i, [(len(used) - 1, c[0])]) for i, c in enumerate(conts)])]
    if share and fits and len(conts) > 1:
        tokens, positions, segments, targets = list(ctx), list(range(len(ctx))), [-1] * len(ctx), []
        for i, c in enumerate(conts):
            scored = [(len(ctx) - 1, c[0])]
            for j in range(len(c) - 1):
                scored.append((len(tokens), c[j + 1]))
                tokens.append(c[j])
                positions.append(len(ctx) + j)
                segments.append(i)
            targets.append((first_request + i, scored))
        return [Row(tokens, positions, segments, targets)]
    rows = []
    for i, c in enumerate(conts):
        whole = (ctx + c)[-(max_len + 1):]
        inp = whole[:-1]
        start = len(inp) - len(c) + 1  # the position whose output predicts c[0]
        rows.append(Row(inp, None, None, [(first_request + i, [(start - 1 + j, c[j]) for j in range(len(c))])]))
    return rows


def tree_mask(segments: list[int], length: int) -> torch.Tensor:
    """[length, length] bool: causal, and a token of segment s sees the context (-1) and segment s only."""
    seg = torch.full((length,), -2, dtype=torch.long)
    seg[: len(segments)] = torch.tensor(segments, dtype=torch.long)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    same = (seg[:, None] == seg[None, :]) | (seg[None, :] == -1)
    mask = causal & same
    mask |= torch.eye(length, dtype=torch.bool)  # padding rows attend to themselves (no NaN)
    return mask


class Scorer:
    """Log-likelihoods of continuations and of whole texts for one loaded model."""

    def __init__(self, model: Transformer, tokenizer, device: torch.device | str = "cpu", batch_tokens: int = 16384,
                 max_batch_size: int = 256, prefix_token: Optional[int] = None, share_context: bool = True,
                 fast: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.batch_tokens = batch_tokens
        self.max_batch_size = max_batch_size
        self.max_len = model.cfg.max_seq_len
        self.prefix_token = prefix_token if prefix_token is not None else 0
        self.share_context = share_context and fast
        self.fast = fast  # False: plain model(tokens) calls (FSDP-wrapped models in the training loop)

    # -- multiple choice --------------------------------------------------------------------------------
    def loglikelihoods(self, contexts: Sequence[str], continuations: Sequence[Sequence[str]]) -> list[list[tuple[float, bool]]]:
        """Per context, per continuation: (sum of log-probabilities, is greedy)."""
        encoded = encode_pairs(self.tokenizer, contexts, continuations, self.prefix_token)
        rows: list[Row] = []
        offsets = []
        n = 0
        for ctx, conts in encoded:
            offsets.append(n)
            rows.extend(plan_rows(ctx, conts, self.max_len, self.share_context, n))
            n += len(conts)
        flat: list[Optional[tuple[float, bool]]] = [None] * n
        for idx, lp, greedy in self._score_rows(rows):
            flat[idx] = (lp, greedy)
        return [[flat[offsets[i] + j] for j in range(len(conts))] for i, (_, conts) in enumerate(encoded)]

    def _batches(self, rows: list[Row]) -> list[list[Row]]:
        order = sorted(rows, key=lambda r: -len(r.tokens))  # longest first: the batch's padded length is its first row
        batches, cur = [], []
        for r in order:
            if cur and ((len(cur) + 1) * len(cur[0].tokens) > self.batch_tokens or len(cur) >= self.max_batch_size):
                batches.append(cur)
                cur = []
            cur.append(r)
        if cur:
            batches.append(cur)
        return batches

    @torch.no_grad()
    def _score_rows(self, rows: list[Row]):
        for batch in self._batches(rows):
            width = len(batch[0].tokens)
            tokens = torch.zeros(len(batch), width, dtype=torch.long)
            for i, r in enumerate(batch):
                tokens[i, : len(r.tokens)] = torch.tensor(r.tokens, dtype=torch.long)
            tokens = tokens.to(self.device)
            tree = any(r.segments is not None for r in batch)
            b_idx, p_idx, tgt, req = [], [], [], []
            for i, r in enumerate(batch):
                for request, scored in r.targets:
                    for pos, target in scored:
                        b_idx.append(i)
                        p_idx.append(pos)
                        tgt.append(target)
                        req.append(request)
            if self.fast:
                positions = mask = None
                if tree:
                    positions = torch.zeros(len(batch), width, dtype=torch.long)
                    mask = torch.zeros(len(batch), width, width, dtype=torch.bool)
                    for i, r in enumerate(batch):
                        pos = r.positions if r.positions is not None else list(range(len(r.tokens)))
                        positions[i, : len(pos)] = torch.tensor(pos, dtype=torch.long)
                        segs = r.segments if r.segments is not None else [-1] * len(r.tokens)
                        mask[i] = tree_mask(segs, width)
                    positions, mask = positions.to(self.device), mask.to(self.device)
                hidden = self.model(tokens, positions, mask, return_hidden=True)
                logp = torch.log_softmax(self.model.logits(hidden[torch.tensor(b_idx), torch.tensor(p_idx)]).float(), dim=-1)
            else:
                logits = self.model(tokens).float()
                logp = torch.log_softmax(logits[torch.tensor(b_idx), torch.tensor(p_idx)], dim=-1)
            tgt_t = torch.tensor(tgt, device=logp.device)
            picked = logp.gather(1, tgt_t[:, None])[:, 0].double().cpu().numpy()
            greedy = (logp.argmax(-1) == tgt_t).cpu().numpy()
            sums: dict[int, list] = {}
            for r_i, lp, g in zip(req, picked, greedy):
                acc = sums.setdefault(r_i, [0.0, True])
                acc[0] += float(lp)
                acc[1] = acc[1] and bool(g)
            for r_i, (lp, g) in sums.items():
                yield r_i, lp, g

    # -- whole texts (perplexity) ------------------------------------------------------------------------
    @torch.no_grad()
    def token_nll(self, windows: list[tuple[list[int], list[int]]]) -> list[np.ndarray]:
        """Per window (input tokens, target tokens scored at its last ``len(targets)`` positions):
        the negative log-likelihood of each target token."""
        order = sorted(range(len(windows)), key=lambda i: -len(windows[i][0]))
        out: list[Optional[np.ndarray]] = [None] * len(windows)
        i = 0
        while i < len(order):
            width = len(windows[order[i]][0])
            n = max(1, min(self.max_batch_size, self.batch_tokens // max(width, 1)))
            idx = order[i : i + n]
            i += n
            tokens = torch.zeros(len(idx), width, dtype=torch.long)
            b_idx, p_idx, tgt = [], [], []
            for row, w in enumerate(idx):
                inp, targets = windows[w]
                tokens[row, : len(inp)] = torch.tensor(inp, dtype=torch.long)
                start = len(inp) - len(targets)
                b_idx.extend([row] * len(targets))
                p_idx.extend(range(start, len(inp)))
                tgt.extend(targets)
            tokens = tokens.to(self.device)
            if self.fast:
                hidden = self.model(tokens, return_hidden=True)
                sel = hidden[torch.tensor(b_idx), torch.tensor(p_idx)]
                nll = torch.cat([
                    F.cross_entropy(self.model.logits(chunk).float(), t, reduction="none")
                    for chunk, t in zip(sel.split(4096), torch.tensor(tgt, device=sel.device).split(4096))
                ])
            else:
                logits = self.model(tokens).float()
                nll = F.cross_entropy(logits[torch.tensor(b_idx), torch.tensor(p_idx)], torch.tensor(tgt, device=logits.device), reduction="none")
            nll = nll.double().cpu().numpy()
            pos = 0
            for w in idx:
                k = len(windows[w][1])
                out[w] = nll[pos : pos + k]
                pos += k
        return out  # type: ignore[return-value]


def rolling_windows(tokens: list[int], prefix_token: int, max_len: int) -> list[tuple[list[int], list[int]]]:
    """lm-eval's ``loglikelihood_rolling`` windows (context_len 1): the first window is the prefix
    token + tokens, later windows predict the next ``max_len`` tokens each, and the last one keeps
    a full ``max_len`` tokens of context. Every token is scored exactly once."""
    if not tokens:
        return []
    first = min(max_len, len(tokens))
    windows = [([prefix_token] + tokens[: first - 1], tokens[:first])]
    predicted = first
    while predicted < len(tokens):
        n = min(len(tokens) - predicted, max_len)
        end = predicted + n
        windows.append((tokens[max(0, end - max_len - 1) : end - 1], tokens[end - n : end]))
        predicted = end
    return windows
