"""Sampling text from a causal language model, written out: temperature, top-k, top-p, and the KV cache.

A language model gives, for every position, logits over the vocabulary: unnormalized scores
whose softmax is the distribution of the next token. Generating is a loop: pick a token from
the last position's distribution, append it, run the model again. How the token is picked:

- greedy (temperature 0): the most probable token, ``argmax(logits)``. Deterministic.
- temperature T: sample from ``softmax(logits / T)``. T < 1 sharpens the distribution towards
  the likeliest tokens, T > 1 flattens it.
- top-k: sample only among the k most probable tokens.
- top-p (nucleus sampling, Holtzman et al., 2019): sample only among the smallest set of most
  probable tokens whose probabilities add up to at least p. The set is small where the model
  is sure and large where it is not, which a fixed k cannot do.

They apply in transformers' order: temperature, then top-k, then top-p. A filter sets the
logits of the tokens it removes to -inf, so softmax gives them probability exactly 0.

The source material samples with temperature 0.7 and top-p 0.9, and so does the command below
by default; ``generate`` itself defaults to greedy (``Sampling()``), which the tests compare with
transformers.

The KV cache: attention at a new position needs the keys and values of every earlier position.
They do not change once computed, so the model keeps them (its ``cache``) and each step feeds
only the one new token (``forward_with_cache``): a step costs one position's work, not the whole
sequence's.

Batches: many prompts are generated at once, one row each. Prompts of different lengths are
padded on the left (``left_pad``) and the attention mask keeps the padding out; K samples of one
prompt share its prefill, the cache copied to the K rows (``samples_per_prompt``); a row that is
finished (EOS, a stop string, a ``stop_when`` test) leaves the batch, so it costs nothing more.
Greedy, a batch gives each row the tokens it would get alone (``tests/test_generate.py``).

    python -m eval.generate --prompt "Name three primary colours."
    python -m eval.generate --prompt "..." --adapter runs/demo/adapter --temperature 0
    python -m eval.generate --novel --adapter runs/demo/adapter   # unseen instructions, base vs adapter
"""

import argparse
import inspect
import sys
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from data.sequences import pad_token_id
from eval.cli import add_model_arguments, load_model_and_adapter
from eval.mode import eval_mode
from lora import disable_lora, mixed_batch

# Out-of-distribution instructions for --novel: nothing like them is in the training data, so the
# adapter's answers show what fine-tuning did to the model's general behaviour.
NOVEL_INSTRUCTIONS = (
    "Write a haiku about autumn.",
    "Tell me a riddle and then give its answer.",
    "Translate into French: The cat is sleeping on the warm windowsill.",
    "Write a two-day travel guide for Paris.",
    "Is 97 a prime number? Explain briefly.",
)


# --- Filters on (batch, vocab) logits -----------------------------------------------------------------------------


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits / temperature``: below 1 sharpens the distribution, above 1 flattens it.

    Shapes: ``(batch, vocab) -> (batch, vocab)``.

    Raises:
        ValueError: ``temperature <= 0`` (temperature 0 is greedy decoding: take the argmax instead).
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 to divide by it, got {temperature!r}; for 0 (greedy) use argmax")
    return logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest logits of each row, set the others to -inf; ``k = 0`` keeps all.

    Shapes: ``(batch, vocab) -> (batch, vocab)``. Ties with the k-th largest are kept too.

    Raises:
        ValueError: ``k`` is not an integer >= 0.
    """
    check_top_k(k)
    if k == 0 or k >= logits.shape[-1]:
        return logits
    kth_largest = torch.topk(logits, k, dim=-1).values[:, -1:]  # (batch, 1)
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most probable tokens whose probabilities sum to at least ``p``.

    Shapes: ``(batch, vocab) -> (batch, vocab)``; removed entries are -inf. At least one token
    (the most probable) is always kept; ``p = 1.0`` keeps all.

    The boundary: a token is removed when the tokens more probable than it already sum to
    ``>= p``; the token whose probability carries the sum across p is kept. This is exactly
    transformers' ``TopPLogitsWarper``, which removes the tokens whose ascending cumulative
    probability is ``<= 1 - p`` (the same set, counted from the other end).

    Raises:
        ValueError: ``p`` is outside (0, 1].
    """
    check_top_p(p)
    if p == 1.0:
        return logits
    # 1. Sort each row from most to least probable.
    sorted_logits, sorted_indices = torch.sort(logits, dim=-1, descending=True)
    # 2. Probabilities, in that order.
    sorted_probs = sorted_logits.softmax(dim=-1)
    # 3. Running total: cumulative[i] is the probability of the i + 1 most probable tokens.
    cumulative = sorted_probs.cumsum(dim=-1)
    # 4. Shift right by one: remove token i when the tokens *before* it already reach p. Testing
    #    cumulative[i] itself would also remove the token that crosses p, and the set would fall short.
    remove = cumulative >= p
    remove[:, 1:] = remove[:, :-1].clone()
    remove[:, 0] = False  # the most probable token always stays
    # 5. Scatter the decisions back from sorted order to vocabulary order.
    remove = remove.scatter(-1, sorted_indices, remove)
    return logits.masked_fill(remove, float("-inf"))


def sample_next_token(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token id per row from the next-token ``logits``.

    Shapes: ``(batch, vocab) -> (batch,)`` int64.

    Args:
        logits: the model's scores for the next token, one row per sequence.
        temperature: 0 means greedy (argmax, and the other settings are ignored); else the divisor.
        top_k: sample among the k most probable tokens only; 0 keeps all.
        top_p: sample among the smallest set of tokens of total probability >= top_p; 1.0 keeps all.
        generator: the random source of ``torch.multinomial``; a seeded one makes the sample repeat.

    Raises:
        ValueError: temperature < 0, top_k < 0 or top_p outside (0, 1].
    """
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = apply_temperature(logits.float(), temperature)
    if top_k == 0 and top_p < 1.0:
        sampled = sample_from_nucleus_candidates(logits, top_p, generator)
        if sampled is not None:
            return sampled
    logits = top_p_filter(top_k_filter(logits, top_k), top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


NUCLEUS_CANDIDATES = 64  # the most probable tokens a nucleus is looked for among first


def sample_from_nucleus_candidates(logits: torch.Tensor, p: float, generator: torch.Generator | None = None,
                                   candidates: int = NUCLEUS_CANDIDATES) -> torch.Tensor | None:
    """Top-p sampling from ``logits (batch, vocab)`` among the ``candidates`` most probable tokens only; None
    when some row's nucleus does not lie among them.

    The same distribution as ``top_p_filter`` then ``multinomial`` over the whole vocabulary,
    when every row's ``candidates`` most probable tokens already hold probability ``>= p``: then
    the nucleus is among them, and the tokens outside it have probability 0 either way. It is
    much cheaper: sorting and sampling 64 numbers a row instead of 49,152 (for SmolLM2, where
    sorting the vocabulary took a third of a forecast's time). The random numbers drawn differ,
    so a seed gives other (equally likely) tokens than the full path does.
    """
    probs = logits.softmax(dim=-1)
    top_probs, top_ids = probs.topk(min(candidates, probs.shape[-1]), dim=-1)  # sorted, most probable first
    cumulative = top_probs.cumsum(dim=-1)
    if not (cumulative[:, -1] >= p).all():
        return None
    remove = (cumulative - top_probs) >= p  # the tokens before this one already reach p, as in top_p_filter
    choice = torch.multinomial(top_probs.masked_fill(remove, 0.0), num_samples=1, generator=generator)
    return top_ids.gather(-1, choice).squeeze(-1)


# --- Checks --------------------------------------------------------------------------------------------------------


def check_top_k(top_k) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 keeps every token), got {top_k!r}")


def check_top_p(top_p) -> None:
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1.0 keeps every token), got {top_p!r}")


def check_sampling(temperature, top_k, top_p) -> None:
    """Raise ``ValueError`` naming the first sampling setting that is out of range."""
    if not temperature >= 0:  # written so, NaN fails too
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature!r}")
    check_top_k(top_k)
    check_top_p(top_p)


# --- Settings: how a token is picked, which text ends a row --------------------------------------------------------


@dataclass(frozen=True)
class Sampling:
    """How ``generate`` picks each next token (``sample_next_token``); ``Sampling()``, or ``GREEDY``, is the argmax.

    The source material samples with ``Sampling(temperature=0.7, top_p=0.9)``. Greedy is the
    default because it is deterministic: the tests compare it with transformers token for token.

    Raises:
        ValueError: temperature < 0, top_k < 0 or top_p outside (0, 1], naming the setting.
    """

    temperature: float = 0.0  # 0 is greedy (argmax; the other settings are then unused); else the divisor
    top_k: int = 0  # sample among the k most probable tokens only; 0 keeps all
    top_p: float = 1.0  # sample among the smallest set of tokens of total probability >= top_p; 1.0 keeps all
    seed: int | None = None  # the same seed and prompts give the same tokens; None: torch's global generator

    def __post_init__(self):
        check_sampling(self.temperature, self.top_k, self.top_p)


GREEDY = Sampling()


@dataclass(frozen=True)
class StopOnText:
    """What in a row's new text ends the row: one of ``stop_strings`` appears in it, or ``stop_when`` is true of it.

    Both read the text ``tokenizer`` decodes from the row's new tokens, once a step, so they cost
    a decode per live row per step; the EOS token (``generate``'s ``eos_token_id``) ends a row
    without one. The token that meets the condition is kept.

    Raises:
        ValueError: ``stop_strings`` is one string, not a list; or a condition is given without a tokenizer.
    """

    tokenizer: object = None  # decodes each row's new tokens into the text the conditions read
    stop_strings: Sequence[str] = ()  # texts that end a row when they appear in its new text
    stop_when: Callable[[str], bool] | None = None  # a test on a row's new text, e.g. "holds 10 ';'"

    def __post_init__(self):
        if isinstance(self.stop_strings, str):
            raise ValueError(f"stop_strings must be a list of strings, got the string {self.stop_strings!r}; "
                             "wrap it: [...]")
        if self.stop_strings and self.tokenizer is None:
            raise ValueError("stop_strings need the tokenizer, to decode the new tokens; pass tokenizer=...")
        if self.stop_when is not None and self.tokenizer is None:
            raise ValueError("stop_when needs the tokenizer, to decode the new tokens; pass tokenizer=...")

    def met(self, text: str) -> bool:
        """Whether a row whose new text is ``text`` is finished."""
        return any(stop in text for stop in self.stop_strings) or (self.stop_when is not None and self.stop_when(text))


def check_generation(max_new_tokens, samples_per_prompt=1, sampling=GREEDY) -> None:
    """The checks ``generate`` makes of its own arguments (``Sampling`` and ``StopOnText`` check theirs when made)."""
    if not isinstance(sampling, Sampling):
        raise TypeError(f"sampling must be a Sampling, got {sampling!r}; write Sampling(temperature=..., top_p=...)")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if isinstance(samples_per_prompt, bool) or not isinstance(samples_per_prompt, int) or samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt must be an integer >= 1, got {samples_per_prompt!r}")


# --- The generation loop -------------------------------------------------------------------------------------------


def cache_argument(model) -> str:
    """The name under which ``model`` takes and returns its KV cache: ``cache`` or ``past_key_values``.

    transformers 5 releases differ in this name, and one that says ``cache`` warns when given
    ``past_key_values``; the project accepts any 5.x, so the model's own signature decides.
    """
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def forward_with_cache(model, input_ids: torch.Tensor, cache=None, attention_mask=None):
    """Run ``model`` on ``input_ids`` following the positions held in ``cache``.

    Shapes: ``input_ids (batch, new)``; ``attention_mask (batch, past + new)`` or None (no padding).

    Args:
        model: a transformers causal LM.
        input_ids: the whole prompt on the first call, then the one new token of each row.
        cache: what the previous call returned (a transformers ``Cache``); None on the first call.
        attention_mask: 0 on left padding, covering the cached positions and the new ones.

    Returns:
        ``(logits, cache)``: the last position's logits ``(batch, vocab)`` in float32, and the
        cache, which now holds the keys and values of the new positions too.
    """
    position_ids = None
    if attention_mask is not None:
        # With left padding a row's positions count from its first real token, not from column 0
        # (as transformers' generate computes them; padding positions get 0 and are masked anyway).
        position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        position_ids = position_ids[:, -input_ids.shape[1]:]
    name = cache_argument(model)
    outputs = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=True,
        logits_to_keep=1,  # only the last position is sampled from: skip a (prompt, vocab) matrix on the prompt
        **{name: cache},
    )
    return outputs.logits[:, -1].float(), outputs[name]


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists of different lengths as one batch, padded on the left: ``(input_ids, attention_mask)``.

    Shapes: B lists -> two ``(B, longest)`` int64 tensors; the mask is 1 on real tokens, 0 on padding.

    Left, not right: every row's last real token then sits in the last column, so one step
    reads every row's next-token logits at the same position and appends after it. The mask
    keeps the padding out of attention, and ``forward_with_cache`` counts positions from it.

    Raises:
        ValueError: no sequences, or an empty one (there is nothing to continue).
    """
    if not sequences or min(len(ids) for ids in sequences) == 0:
        raise ValueError("left_pad needs at least one sequence and no empty one; give each prompt a token")
    longest = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, longest - len(ids):] = torch.as_tensor(ids, dtype=torch.long)
        attention_mask[row, longest - len(ids):] = 1
    return input_ids, attention_mask


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    sampling: Sampling = GREEDY,
    eos_token_id: int | None = None,
    stop: StopOnText | None = None,
    attention_mask: torch.Tensor | None = None,
    samples_per_prompt: int = 1,
    adapter_names: Sequence[str] | None = None,
) -> torch.Tensor:
    """Continue each row of ``input_ids`` ``samples_per_prompt`` times; return the new token ids.

    Shapes: ``input_ids (batch, prompt) -> (batch * samples_per_prompt, n_new)``, ``n_new <= max_new_tokens``;
    the rows are prompt 0's samples, then prompt 1's, and so on.

    Rows are prompts; prompts of different lengths are left-padded (``left_pad``) and given their
    ``attention_mask``. K samples of one prompt are ``samples_per_prompt=K``: the prompt is
    computed once and its KV cache copied to the K rows, not computed K times. A row is
    finished once it produces ``eos_token_id`` (which is kept), or its decoded new text meets
    ``stop`` (the token that did it is kept); after that its positions hold the EOS id (the
    tokenizer's pad id when there is no EOS id), so the result is rectangular. A finished row
    leaves the batch, and generation stops when every row is finished.

    Greedy with EOS is the common call: ``generate(model, ids, 40, eos_token_id=tokenizer.eos_token_id)``;
    sampled, ``generate(model, ids, 40, sampling=Sampling(temperature=0.7, top_p=0.9, seed=0), ...)``.

    Args:
        model: a transformers causal LM; in eval mode while generating (no dropout), its own mode after.
        input_ids: the prompts, ``(batch, prompt)``.
        max_new_tokens: the most tokens to add to each row.
        sampling: how each token is picked (temperature, top-k, top-p, seed); the default is greedy.
        eos_token_id: the token that ends a row (``tokenizer.eos_token_id``); None: rows end only
            at a ``stop`` condition or after ``max_new_tokens``.
        stop: stop strings and a ``stop_when`` test on each row's new text, with the tokenizer that
            decodes it; None: no text ends a row.
        attention_mask: ``(batch, prompt)``, 0 on left padding; None when there is none.
        samples_per_prompt: rows generated from each prompt (K samples); 1 by default.
        adapter_names: one named adapter per prompt (``lora/named.py``; ``"__base__"``: none), each
            row generated with its own in one mixed batch (``lora/mixed.py``); None: the active adapter.

    Raises:
        ValueError: max_new_tokens < 1 or samples_per_prompt < 1 (``Sampling`` and ``StopOnText``
            raise on their own settings when they are made).
        TypeError: ``sampling`` is not a ``Sampling`` (a bare temperature, say).
    """
    check_generation(max_new_tokens, samples_per_prompt, sampling)
    # No dropout while generating (the caller's train/eval mode comes back after); with adapter_names,
    # every row through its own adapter (``row_adapters`` follows the rows the loop repeats and drops).
    mixing = mixed_batch(model, adapter_names) if adapter_names is not None else nullcontext()
    with eval_mode(model), mixing as row_adapters:
        generator = None if sampling.seed is None else torch.Generator(input_ids.device).manual_seed(sampling.seed)
        stops = stop is not None and (bool(stop.stop_strings) or stop.stop_when is not None)
        # After a row finishes, its positions hold the EOS id; with stop conditions alone, the tokenizer's pad id.
        # (Without either no row finishes early, and every position is written.)
        fill_id = eos_token_id if eos_token_id is not None else pad_token_id(stop.tokenizer) if stops else 0

        # 1. Prefill, once per distinct prompt: one forward over the prompts puts the keys and values
        #    of every prompt position in the cache and gives the distribution of the first new token.
        logits, cache = forward_with_cache(model, input_ids, None, attention_mask)

        # 2. Expand to the samples: each prompt's cache, last logits and mask copied K times (rows
        #    prompt 0 x K, prompt 1 x K, ...), the prompt's work done once. The samples part from the first token on.
        if samples_per_prompt > 1:
            cache.batch_repeat_interleave(samples_per_prompt)
            if row_adapters is not None:
                row_adapters.repeat_interleave(samples_per_prompt)
            logits = logits.repeat_interleave(samples_per_prompt, dim=0)
            if attention_mask is not None:
                attention_mask = attention_mask.repeat_interleave(samples_per_prompt, dim=0)

        rows = logits.shape[0]
        new_tokens = torch.full((rows, max_new_tokens), fill_id, dtype=torch.long, device=input_ids.device)
        live = torch.arange(rows, device=input_ids.device)  # the rows still written; cache and logits hold these only
        for step in range(max_new_tokens):
            # 3. Pick each live row's next token.
            next_ids = sample_next_token(logits, sampling.temperature, sampling.top_k, sampling.top_p, generator)
            new_tokens[live, step] = next_ids

            # 4. A row is finished at EOS, or when its new text meets a stop condition.
            finished = next_ids == eos_token_id if eos_token_id is not None else torch.zeros_like(next_ids, dtype=bool)
            if stops:
                candidates = (~finished).nonzero().flatten()
                texts = stop.tokenizer.batch_decode(new_tokens[live[candidates], : step + 1])
                for index, text in zip(candidates.tolist(), texts):
                    finished[index] = stop.met(text)

            # 5. A finished row leaves the batch (its cache rows too): its tokens are written, and the
            #    model no longer runs on it. Rows never attend to each other, so the others go on as before.
            if finished.any():
                keep = (~finished).nonzero().flatten()
                live, next_ids = live[keep], next_ids[keep]
                cache.batch_select_indices(keep)
                if row_adapters is not None:
                    row_adapters.select(keep)
                if attention_mask is not None:
                    attention_mask = attention_mask[keep]
            if len(live) == 0 or step == max_new_tokens - 1:
                break

            # 6. Feed only the new token: the cache holds everything before it.
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(next_ids), 1)], dim=1)
            logits, cache = forward_with_cache(model, next_ids[:, None], cache, attention_mask)
        return new_tokens[:, : step + 1]


# --- The command ----------------------------------------------------------------------------------------------------


def format_prompt(tokenizer, prompt: str) -> str:
    """The text the model is given: ``prompt`` in the tokenizer's chat template when it has one, else as is.

    An instruct model was trained on conversations in its template; a bare prompt is a
    different input from the one it learned to answer.
    """
    if not getattr(tokenizer, "chat_template", None):
        return prompt
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)


def complete_all(model, tokenizer, prompts: Sequence[str], args: argparse.Namespace) -> list[str]:
    """The model's answers to ``prompts`` (each wrapped in the chat template), ``args.batch_size`` per batch.

    Each batch is one ``generate`` call on the left-padded prompts, with the command's sampling
    settings and seed; EOS ends each answer.
    """
    # A chat template already holds the special tokens: the tokenizer must not add a BOS of its own.
    has_template = bool(getattr(tokenizer, "chat_template", None))
    answers = []
    for start in range(0, len(prompts), args.batch_size):
        texts = [format_prompt(tokenizer, prompt) for prompt in prompts[start : start + args.batch_size]]
        ids = [tokenizer(text, add_special_tokens=not has_template).input_ids for text in texts]
        input_ids, attention_mask = left_pad(ids, pad_token_id(tokenizer))
        new = generate(model, input_ids.to(model.device), args.max_new_tokens, sampling=command_sampling(args),
                       eos_token_id=tokenizer.eos_token_id, attention_mask=attention_mask.to(model.device))
        answers += [answer.strip() for answer in tokenizer.batch_decode(new, skip_special_tokens=True)]
    return answers


def command_sampling(args: argparse.Namespace) -> Sampling:
    """The command's ``--temperature``, ``--top-k``, ``--top-p`` and ``--seed`` as one ``Sampling`` (checked)."""
    return Sampling(args.temperature, args.top_k, args.top_p, args.seed)


def complete(model, tokenizer, prompt: str, args: argparse.Namespace) -> str:
    """The model's answer to one ``prompt`` (wrapped in the chat template) with the command's sampling settings."""
    return complete_all(model, tokenizer, [prompt], args)[0]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m eval.generate",
        description="Sample a completion from a model, with or without a LoRA adapter.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="the instruction to answer (wrapped in the chat template when there is one)")
    what.add_argument("--novel", action="store_true",
                      help="answer fixed out-of-distribution instructions: the base model's answer, then the "
                           "adapter's (the base model's only, without --adapter)")
    add_model_arguments(parser)
    parser.add_argument("--max-new-tokens", type=int, default=128, help="the most tokens to generate per answer")
    parser.add_argument("--temperature", type=float, default=0.7, help="0 is greedy; the source material uses 0.7")
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling; 1.0 keeps every token")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens; 0 keeps all")
    parser.add_argument("--seed", type=int, default=0, help="the same seed gives the same answer")
    parser.add_argument("--batch-size", type=int, default=len(NOVEL_INSTRUCTIONS),
                        help="--novel: instructions answered in one batch")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)  # an unknown flag: argparse prints one line and exits with status 2
    try:
        check_generation(args.max_new_tokens)
        command_sampling(args)
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
        # 1. The base model, then the adapter (LoRA injected and loaded) when one is given.
        model, tokenizer = load_model_and_adapter(args)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    # 2. One prompt: print its completion.
    if not args.novel:
        print(complete(model, tokenizer, args.prompt, args))
        return 0

    # 3. --novel: every instruction answered by the base model (LoRA switched off), then with the
    #    adapter, in batches from the same seed, so the difference between the answers is the adapter's doing.
    if args.adapter is None:
        print("no --adapter given: the base model's answers only")
    with disable_lora(model):
        base_answers = complete_all(model, tokenizer, NOVEL_INSTRUCTIONS, args)
    adapter_answers = complete_all(model, tokenizer, NOVEL_INSTRUCTIONS, args) if args.adapter is not None else None
    for number, instruction in enumerate(NOVEL_INSTRUCTIONS, 1):
        print(f"=== {number}/{len(NOVEL_INSTRUCTIONS)}: {instruction}")
        print(f"--- base model ({args.model}):\n{base_answers[number - 1]}")
        if adapter_answers is not None:
            print(f"--- with the adapter ({args.adapter}):\n{adapter_answers[number - 1]}")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
