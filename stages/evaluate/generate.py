"""Greedy generation with stop sequences and a length cap, batched, with a KV cache -- what
lm-eval's ``generate_until`` asks a model, answered as its Hugging Face backend answers it:

* the prompt is ``encode(context)`` (the tokenizer's own special tokens), its last
  ``max_len - max_gen_toks`` tokens kept;
* at most ``max_gen_toks`` new tokens, each the argmax of the next-token logits; a row stops at
  the EOS token or as soon as one of ``until`` appears in the decoded tail of what it generated
  (lm-eval's ``MultiTokenEOSCriteria``: the last ``len(encode(stop)) + 2`` tokens);
* the answer is the decoded continuation (special tokens skipped) cut at each stop sequence in
  turn (lm-eval's ``postprocess_generated_text``).

Rows are sorted by length and left-padded into batches of at most ``max_batch_size`` rows and
``batch_tokens`` tokens; every row has its own positions (its first real token is position 0) and
padding is masked out, so a row's answer does not depend on the rows beside it. lmpipe's own
model runs through :class:`~stages.model.transformer.LayerCache`; any other Hugging Face causal
LM through its ``past_key_values``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from stages.model.transformer import LayerCache, Transformer


def postprocess(text: str, until: Sequence[str]) -> str:
    for term in until:
        if term:
            text = text.split(term)[0]
    return text


class Generator:
    def __init__(self, model: torch.nn.Module, tokenizer, eos_token: Optional[int], device: torch.device | str = "cpu",
                 batch_tokens: int = 16384, max_batch_size: int = 64):
        self.model = model
        self.tokenizer = tokenizer
        self.eos_token = eos_token
        self.device = torch.device(device)
        self.batch_tokens = batch_tokens
        self.max_batch_size = max_batch_size
        self.max_len = model.cfg.max_seq_len

    def generate(self, contexts: Sequence[str], until: Sequence[str], max_gen_toks: int) -> list[str]:
        if max_gen_toks >= self.max_len:
            raise ValueError(f"max_gen_toks {max_gen_toks} leaves no room for a prompt in the model's {self.max_len}-token window")
        max_ctx = self.max_len - max_gen_toks
        prompts = [list(e.ids)[-max_ctx:] for e in self.tokenizer.encode_batch(list(contexts))]
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"request {i}: the prompt encodes to no tokens")
        lookback = {s: len(self.tokenizer.encode(s, add_special_tokens=False).ids) + 2 for s in until if s}
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # longest first: a batch's width is its first row
        out: list[Optional[str]] = [None] * len(prompts)
        i = 0
        while i < len(order):
            width = len(prompts[order[i]]) + max_gen_toks
            n = max(1, min(self.max_batch_size, self.batch_tokens // width))
            batch = order[i : i + n]
            i += n
            for idx, tokens in zip(batch, self._generate_batch([prompts[j] for j in batch], max_gen_toks, lookback)):
                out[idx] = postprocess(self.tokenizer.decode(tokens, skip_special_tokens=True), until)
        return out  # type: ignore[return-value]

    def _stopped(self, generated: list[int], lookback: dict[str, int]) -> bool:
        if generated and generated[-1] == self.eos_token:
            return True
        for stop, k in lookback.items():
            if stop in self.tokenizer.decode(generated[-k:], skip_special_tokens=True):
                return True
        return False

    @torch.no_grad()
    def _generate_batch(self, prompts: list[list[int]], max_gen_toks: int, lookback: dict[str, int]) -> list[list[int]]:
        b, width = len(prompts), max(len(p) for p in prompts)
        pad = [width - len(p) for p in prompts]
        tokens = torch.zeros(b, width, dtype=torch.long)
        for r, p in enumerate(prompts):
            tokens[r, pad[r]:] = torch.tensor(p, dtype=torch.long)
        real = torch.arange(width)[None, :] >= torch.tensor(pad)[:, None]  # [b, width]: not padding
        positions = (torch.arange(width)[None, :] - torch.tensor(pad)[:, None]).clamp(min=0)
        step = _Stepper(self.model, b, self.device)
        logits = step(tokens, positions, real, first=True)
        generated: list[list[int]] = [[] for _ in range(b)]
        done = [False] * b
        lengths = torch.tensor([len(p) for p in prompts])
        for t in range(max_gen_toks):
            nxt = logits.argmax(-1).cpu()
            for r in range(b):
                if not done[r]:
                    generated[r].append(int(nxt[r]))
                    done[r] = self._stopped(generated[r], lookback)
            if all(done) or t == max_gen_toks - 1:
                break
            real = torch.cat([real, torch.ones(b, 1, dtype=torch.bool)], dim=1)
            logits = step(nxt[:, None], (lengths + t)[:, None], real, first=False)
        return [[tok for tok in g if tok != self.eos_token] for g in generated]


class _Stepper:
    """One forward over new tokens with the cache of the earlier ones; returns the last position's logits."""

    def __init__(self, model: torch.nn.Module, batch: int, device: torch.device):
        self.model = model
        self.device = device
        self.own = isinstance(model, Transformer)
        self.cache = [LayerCache() for _ in model.layers] if self.own else None
        self.past = None

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, real: torch.Tensor, first: bool) -> torch.Tensor:
        tokens, positions, real = tokens.to(self.device), positions.to(self.device), real.to(self.device)
        t, s = tokens.shape[1], real.shape[1]
        if self.own:
            causal = torch.ones(t, s, dtype=torch.bool, device=self.device).tril(diagonal=s - t)
            mask = causal[None] & real[:, None, :]
            mask = mask | _self_attend(t, s, self.device)
            hidden = self.model(tokens, positions, mask, return_hidden=True, cache=self.cache)
            return self.model.logits(hidden[:, -1]).float()
        out = self.model.hf(input_ids=tokens, attention_mask=real.long(), position_ids=positions, past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values
        return out.logits[:, -1].float()


def _self_attend(t: int, s: int, device) -> torch.Tensor:
    """Every new token may attend to itself: a padding row then has one key and no NaN."""
    eye = torch.zeros(t, s, dtype=torch.bool, device=device)
    eye[torch.arange(t), torch.arange(s - t, s)] = True
    return eye[None]
