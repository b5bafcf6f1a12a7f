"""Sampling: the filters equal transformers' warpers, greedy equals model.generate, the KV cache, stopping, the CLI."""

import math
from argparse import Namespace
from dataclasses import replace

import pytest
import torch
from conftest import randomize_lora, token_batch
from torch.testing import assert_close
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from eval.cli import load_model_and_adapter
from eval.generate import (
    NOVEL_INSTRUCTIONS,
    Sampling,
    StopOnText,
    apply_temperature,
    format_prompt,
    forward_with_cache,
    generate,
    left_pad,
    main,
    sample_from_nucleus_candidates,
    sample_next_token,
    top_k_filter,
    top_p_filter,
)
from lora import inject_lora, save_adapter
from models.loader import TINY_SHAPE, char_tokenizer, load_tokenizer, tiny_model

EXACT = dict(rtol=0, atol=0)
TINY_EOS = TINY_SHAPE["eos_token_id"]


def random_logits(batch=16, vocab=1000, seed=0, scale=3.0):
    """Seeded ``(batch, vocab)`` logits, spread enough that top-p keeps a few tokens, not one or all."""
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def transformers_greedy(model, ids, max_new_tokens, eos_token_id, attention_mask=None):
    """The new tokens of ``model.generate`` in greedy mode, finished rows padded with EOS as ``generate`` does."""
    attention_mask = torch.ones_like(ids) if attention_mask is None else attention_mask
    out = model.generate(ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=max_new_tokens,
                         eos_token_id=eos_token_id, pad_token_id=TINY_EOS if eos_token_id is None else eos_token_id)
    return out[:, ids.shape[1]:]


def cut_at_first(tokens: torch.Tensor, finished_at: list[int | None], fill: int) -> torch.Tensor:
    """The expected output: row i as is up to step ``finished_at[i]``, ``fill`` after it; as long as the last row."""
    steps = tokens.shape[1] if None in finished_at else max(finished_at) + 1
    expected = tokens[:, :steps].clone()
    for row, at in enumerate(finished_at):
        if at is not None:
            expected[row, at + 1:] = fill
    return expected


# --- The filters, against transformers' logits warpers ------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.3, 0.7, 1.0, 2.5])
def test_temperature_equals_transformers_warper(temperature):
    logits = random_logits()
    assert_close(apply_temperature(logits, temperature), TemperatureLogitsWarper(temperature)(None, logits), **EXACT)


@pytest.mark.parametrize("k", [1, 5, 50, 999, 1000, 5000])
def test_top_k_filter_equals_transformers_warper(k):
    logits = random_logits()
    ours = top_k_filter(logits, k)
    assert_close(ours, TopKLogitsWarper(k)(None, logits), **EXACT)
    assert ((ours > -math.inf).sum(dim=-1) == min(k, logits.shape[-1])).all()


@pytest.mark.parametrize("p", [1e-4, 0.1, 0.5, 0.7, 0.9, 0.95, 0.999])
def test_top_p_filter_equals_transformers_warper(p):
    logits = random_logits()
    ours = top_p_filter(logits, p)
    assert_close(ours, TopPLogitsWarper(p)(None, logits), **EXACT)
    kept = (ours > -math.inf).sum(dim=-1)
    assert (kept >= 1).all() and (kept < logits.shape[-1]).all()


def test_top_p_filter_after_top_k_equals_transformers_warpers():
    logits = random_logits()
    ours = top_p_filter(top_k_filter(apply_temperature(logits, 0.7), 20), 0.9)
    theirs = TopPLogitsWarper(0.9)(None, TopKLogitsWarper(20)(None, TemperatureLogitsWarper(0.7)(None, logits)))
    assert_close(ours, theirs, **EXACT)


def test_top_p_keeps_the_smallest_set_that_reaches_p():
    logits = torch.tensor([[0.2, 0.5, 0.3]]).log()  # most probable first: 0.5, 0.3, 0.2
    kept = {p: (top_p_filter(logits, p) > -math.inf).tolist()[0] for p in (0.4, 0.75, 0.85)}
    assert kept == {0.4: [False, True, False], 0.75: [False, True, True], 0.85: [True, True, True]}


def test_top_p_always_keeps_the_most_probable_token():
    logits = random_logits()
    filtered = top_p_filter(logits, 1e-9)
    expected = torch.full_like(logits, -math.inf).scatter(-1, logits.argmax(-1, keepdim=True),
                                                          logits.max(-1, keepdim=True).values)
    assert_close(filtered, expected, **EXACT)


def test_top_k_0_and_top_p_1_keep_every_token():
    logits = random_logits()
    assert_close(top_k_filter(logits, 0), logits, **EXACT)
    assert_close(top_p_filter(logits, 1.0), logits, **EXACT)


# --- Sampling one token -------------------------------------------------------------------------------------------


def test_temperature_0_is_the_argmax():
    logits = random_logits()
    assert_close(sample_next_token(logits, temperature=0, top_k=3, top_p=0.5), logits.argmax(-1), **EXACT)


def test_samples_follow_the_tempered_distribution():
    logits = torch.tensor([[1.0, 0.0, -1.0, 2.0, 0.5]]).repeat(40_000, 1)
    generator = torch.Generator().manual_seed(0)
    ids = sample_next_token(logits, temperature=0.7, generator=generator)
    frequencies = torch.bincount(ids, minlength=5) / len(ids)
    # Binomial standard error at 40,000 draws is at most 0.0025; 0.01 is four of them.
    assert_close(frequencies, (logits[0] / 0.7).softmax(-1), rtol=0, atol=0.01)


def test_samples_come_only_from_the_tokens_the_filters_keep():
    logits = random_logits(batch=8).repeat(200, 1)  # 200 draws from each of 8 distributions
    ids = sample_next_token(logits, temperature=1.5, top_k=10, top_p=0.6, generator=torch.Generator().manual_seed(0))
    allowed = top_p_filter(top_k_filter(apply_temperature(logits, 1.5), 10), 0.6) > -math.inf
    assert allowed.gather(-1, ids[:, None]).all()
    assert len(ids.unique()) > 8  # some rows keep several tokens, and more than the argmax was drawn


def test_same_seed_gives_the_same_tokens_and_another_seed_others(tiny):
    prompt = token_batch(tiny, batch=1, length=6).repeat(4, 1)  # K = 4 samples of one prompt
    sampling = Sampling(temperature=1.0, top_p=0.95, seed=0)
    first, again = generate(tiny, prompt, 20, sampling=sampling), generate(tiny, prompt, 20, sampling=sampling)
    other = generate(tiny, prompt, 20, sampling=replace(sampling, seed=1))
    assert_close(again, first, **EXACT)
    assert not torch.equal(other, first)
    assert len({tuple(row) for row in first.tolist()}) == 4  # the K samples differ from each other


# --- Generation: greedy against transformers, the KV cache, stopping -------------------------------------------------


@pytest.mark.parametrize("eos", [None, TINY_EOS])
def test_greedy_equals_transformers_generate(tiny, eos):
    ids = token_batch(tiny, batch=3, length=8)
    ours = generate(tiny, ids, max_new_tokens=24, eos_token_id=eos)
    assert_close(ours, transformers_greedy(tiny, ids, 24, eos), **EXACT)


def test_greedy_with_left_padding_equals_transformers_generate(tiny):
    ids = token_batch(tiny, batch=3, length=10)
    mask = torch.ones_like(ids)
    mask[0, :4], mask[1, :1] = 0, 0  # rows of 6, 9 and 10 prompt tokens
    ids = ids.masked_fill(mask == 0, TINY_SHAPE["pad_token_id"])
    ours = generate(tiny, ids, max_new_tokens=16, attention_mask=mask)
    assert_close(ours, transformers_greedy(tiny, ids, 16, None, attention_mask=mask), **EXACT)


def test_kv_cache_gives_the_logits_of_recomputing_the_full_sequence(tiny):
    ids = token_batch(tiny, batch=2, length=16)
    with torch.no_grad():
        full = tiny(ids).logits  # (batch, 16, vocab), every position recomputed from scratch
        logits, cache = forward_with_cache(tiny, ids[:, :5])
        assert_close(logits, full[:, 4])
        for t in range(5, 16):
            logits, cache = forward_with_cache(tiny, ids[:, t:t + 1], cache)  # one new token, the rest cached
            assert_close(logits, full[:, t])
    assert cache.get_seq_length() == 16


def test_eos_ends_a_row_the_rest_is_eos_and_rows_finish_independently(tiny):
    ids = token_batch(tiny, batch=3, length=8)
    free = generate(tiny, ids, max_new_tokens=16)  # greedy, never stopped
    eos = int(free[0, 3])  # a token row 0 produces by step 3: pretend it is the EOS
    finished_at = [row.index(eos) if eos in row else None for row in free.tolist()]
    assert len(set(finished_at)) > 1, "the rows should finish at different steps for this test to mean something"
    assert_close(generate(tiny, ids, max_new_tokens=16, eos_token_id=eos), cut_at_first(free, finished_at, eos),
                 **EXACT)


def test_generation_stops_when_every_row_is_finished(tiny):
    ids = token_batch(tiny, batch=1, length=8).repeat(3, 1)
    free = generate(tiny, ids, max_new_tokens=16)
    eos = int(free[0, 3])
    out = generate(tiny, ids, max_new_tokens=16, eos_token_id=eos)
    assert out.shape == (3, free[0].tolist().index(eos) + 1)


def test_stop_string_ends_a_row_and_the_rest_is_padding():
    model, tokenizer = tiny_model("tiny-llama"), char_tokenizer()
    ids = token_batch(model, batch=3, length=8, seed=1)
    free = generate(model, ids, max_new_tokens=16)
    stop = tokenizer.decode(free[0, 4:6])  # two characters row 0 writes at steps 4 and 5
    finished_at = [next((t for t in range(16) if stop in tokenizer.decode(row[:t + 1])), None) for row in free]
    assert finished_at[0] <= 5 and len(set(finished_at)) > 1
    out = generate(model, ids, max_new_tokens=16, stop=StopOnText(tokenizer, stop_strings=[stop]))
    assert_close(out, cut_at_first(free, finished_at, tokenizer.pad_token_id), **EXACT)


# --- Batches: left padding, one prefill per prompt, rows that stop on their own ---------------------------------------


def prompts_of_lengths(model, lengths, seed=0):
    """Seeded token-id lists of the given ``lengths``, within the model's vocabulary."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, model.config.vocab_size, (n,), generator=generator).tolist() for n in lengths]


def test_left_pad_puts_the_padding_on_the_left_and_masks_it():
    input_ids, attention_mask = left_pad([[5, 6, 7], [8], [9, 10]], pad_id=0)
    assert_close(input_ids, torch.tensor([[5, 6, 7], [0, 0, 8], [0, 9, 10]]), **EXACT)
    assert_close(attention_mask, torch.tensor([[1, 1, 1], [0, 0, 1], [0, 1, 1]]), **EXACT)
    with pytest.raises(ValueError, match="left_pad needs at least one sequence and no empty one"):
        left_pad([[1], []], pad_id=0)


@pytest.mark.parametrize("eos", [None, "a token the rows write"])
def test_batched_greedy_gives_each_prompt_the_tokens_it_gets_alone(tiny, eos):
    prompts = prompts_of_lengths(tiny, (5, 12, 8, 1, 12))
    alone = [generate(tiny, torch.tensor([prompt]), max_new_tokens=24)[0] for prompt in prompts]
    if eos is not None:  # rows then finish at different steps and leave the batch: the others must not change
        eos = int(alone[0][3])
        finished_at = [row.index(eos) if eos in row else None for row in (tokens.tolist() for tokens in alone)]
        assert len(set(finished_at)) > 1, "the rows should finish at different steps for this test to mean something"
        alone = list(cut_at_first(torch.stack(alone), finished_at, eos))
    input_ids, attention_mask = left_pad(prompts, TINY_SHAPE["pad_token_id"])
    batched = generate(tiny, input_ids, max_new_tokens=24, eos_token_id=eos, attention_mask=attention_mask)
    # Tokens, exactly. The logits agree to the last bits only: a matmul over 5 rows sums in
    # another order than over 1 (the same happens without padding), never enough to change an argmax here.
    assert_close(batched, torch.stack(alone), **EXACT)


def test_prefill_once_then_expand_gives_the_tokens_of_repeating_each_prompt(tiny):
    prompts = prompts_of_lengths(tiny, (6, 10, 3))
    input_ids, attention_mask = left_pad(prompts, TINY_SHAPE["pad_token_id"])
    repeated = generate(tiny, input_ids.repeat_interleave(4, dim=0), max_new_tokens=16,
                        attention_mask=attention_mask.repeat_interleave(4, dim=0))
    expanded = generate(tiny, input_ids, max_new_tokens=16, attention_mask=attention_mask, samples_per_prompt=4)
    assert expanded.shape == (12, 16)
    assert_close(expanded, repeated, **EXACT)


def test_expanded_cache_gives_the_logits_of_the_repeated_prompt(tiny):
    prompt, next_ids = token_batch(tiny, batch=1, length=9), token_batch(tiny, batch=3, length=1, seed=1)
    with torch.no_grad():
        _, cache = forward_with_cache(tiny, prompt)
        cache.batch_repeat_interleave(3)  # one prefill, its keys and values copied to the 3 rows
        expanded, _ = forward_with_cache(tiny, next_ids, cache)
        repeated = tiny(torch.cat([prompt.repeat(3, 1), next_ids], dim=1)).logits[:, -1]
    assert_close(expanded, repeated)  # fp32's tolerance: 3 rows sum in another order than 1


def test_samples_per_prompt_repeat_with_their_seed_and_differ_with_another(tiny):
    input_ids, attention_mask = left_pad(prompts_of_lengths(tiny, (6, 4)), TINY_SHAPE["pad_token_id"])
    sampling = Sampling(temperature=1.0, top_p=0.95, seed=0)
    settings = dict(max_new_tokens=20, attention_mask=attention_mask, samples_per_prompt=3)
    first, again = (generate(tiny, input_ids, sampling=sampling, **settings) for _ in range(2))
    other = generate(tiny, input_ids, sampling=replace(sampling, seed=1), **settings)
    assert_close(again, first, **EXACT)
    assert not torch.equal(other, first)
    assert len({tuple(row) for row in first.tolist()}) == 6  # the samples differ, within a prompt and across


def test_stop_when_ends_each_row_at_its_horizon_and_the_batch_when_every_row_is_done():
    model, tokenizer = tiny_model("tiny-llama"), char_tokenizer()
    input_ids, attention_mask = left_pad(tokenizer(["hello", "a;b;c", "12,3"]).input_ids, tokenizer.pad_token_id)
    free = generate(model, input_ids, max_new_tokens=32, attention_mask=attention_mask)
    # This model writes "Q" often: a row's horizon is its third "Q", as a forecast's is its horizon-th ";".
    finished_at = [next((t for t in range(32) if tokenizer.decode(row[:t + 1]).count("Q") >= 3), None) for row in free]
    assert None not in finished_at and len(set(finished_at)) == 3 and max(finished_at) < 31
    out = generate(model, input_ids, max_new_tokens=32, attention_mask=attention_mask,
                   stop=StopOnText(tokenizer, stop_when=lambda text: text.count("Q") >= 3))
    assert_close(out, cut_at_first(free, finished_at, tokenizer.pad_token_id), **EXACT)  # ends at the last row's end


@pytest.mark.parametrize(
    "settings, message",
    [  # each a function: Sampling and StopOnText raise when they are made, inside pytest.raises
        (lambda: dict(sampling=Sampling(temperature=-0.1)), r"temperature must be >= 0 \(0 means greedy\), got -0.1"),
        (lambda: dict(sampling=Sampling(temperature=math.nan)), "temperature must be >= 0"),
        (lambda: dict(sampling=Sampling(top_p=0.0)), r"top_p must be in \(0, 1\] \(1.0 keeps every token\), got 0.0"),
        (lambda: dict(sampling=Sampling(top_p=1.5)), r"top_p must be in \(0, 1\]"),
        (lambda: dict(sampling=Sampling(top_k=-1)), r"top_k must be an integer >= 0 \(0 keeps every token\), got -1"),
        (lambda: dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1, got 0"),
        (lambda: dict(stop=StopOnText(stop_strings=["\n"])),
         "stop_strings need the tokenizer, to decode the new tokens; pass tokenizer="),
        (lambda: dict(stop=StopOnText(char_tokenizer(), stop_strings="\n")), "stop_strings must be a list of strings"),
        (lambda: dict(stop=StopOnText(stop_when=str.isdigit)),
         "stop_when needs the tokenizer, to decode the new tokens; pass tokenizer="),
        (lambda: dict(samples_per_prompt=0), "samples_per_prompt must be an integer >= 1, got 0"),
    ],
)
def test_bad_settings_raise_a_one_line_error(settings, message):
    model = tiny_model("tiny-llama")
    with pytest.raises(ValueError, match=message) as error:
        generate(model, token_batch(model), **{"max_new_tokens": 4, **settings()})
    assert "\n" not in str(error.value)


def test_sampling_given_as_a_bare_number_is_a_one_line_type_error_naming_sampling():
    model = tiny_model("tiny-llama")
    with pytest.raises(TypeError, match=r"^sampling must be a Sampling, got 0.7; write Sampling\(") as error:
        generate(model, token_batch(model), 4, 0.7)
    assert "\n" not in str(error.value)


def test_the_filters_reject_settings_out_of_range():
    logits = random_logits()
    with pytest.raises(ValueError, match="temperature must be > 0 to divide by it, got 0; for 0 .greedy. use argmax"):
        apply_temperature(logits, 0)
    with pytest.raises(ValueError, match="top_k must be an integer >= 0"):
        top_k_filter(logits, 2.5)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        top_p_filter(logits, -0.5)


# --- The command ------------------------------------------------------------------------------------------------------


TINY_RUN = ["--model", "tiny-llama", "--max-new-tokens", "12", "--precision", "fp32"]


def test_prompt_is_wrapped_in_the_chat_template_only_when_there_is_one():
    tokenizer = char_tokenizer()
    assert format_prompt(tokenizer, "Hi") == "Hi"
    tokenizer.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% endif %}")
    assert format_prompt(tokenizer, "Hi") == "<user>Hi<assistant>"


def test_command_prints_the_completion_generate_gives(capsys):
    assert main([*TINY_RUN, "--prompt", "Hello", "--temperature", "0"]) == 0
    model, tokenizer = tiny_model("tiny-llama"), char_tokenizer()
    new = generate(model, tokenizer("Hello", return_tensors="pt").input_ids, 12, eos_token_id=tokenizer.eos_token_id)
    assert capsys.readouterr().out == tokenizer.decode(new[0], skip_special_tokens=True).strip() + "\n"


def test_command_with_the_same_seed_prints_the_same_sample(capsys):
    outputs = []
    for seed in ("0", "0", "1"):
        assert main([*TINY_RUN, "--prompt", "Hello", "--seed", seed]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] != outputs[2]


def tiny_adapter(folder, hidden_size=TINY_SHAPE["hidden_size"]):
    """An adapter folder with seeded non-zero A and B, saved from a tiny Llama of ``hidden_size``."""
    model = AutoModelForCausalLM.from_config(LlamaConfig(**{**TINY_SHAPE, "hidden_size": hidden_size}))
    inject_lora(model)
    return save_adapter(randomize_lora(model), folder)


def novel_answers(out: str, label: str) -> list[str]:
    """The answers under the ``--- <label>`` headers of ``--novel``'s output, in order."""
    sections = out.split("--- ")[1:]
    return [section.split(":\n", 1)[1].split("\n===")[0].strip() for section in sections if section.startswith(label)]


def test_novel_prints_base_then_adapter_answers_and_the_base_ones_are_the_model_without_it(tmp_path, capsys):
    adapter = tiny_adapter(tmp_path / "adapter")
    assert main([*TINY_RUN, "--novel", "--adapter", str(adapter)]) == 0
    out = capsys.readouterr().out
    assert out.count("=== ") == len(NOVEL_INSTRUCTIONS)
    base, adapted = novel_answers(out, "base model"), novel_answers(out, "with the adapter")
    assert len(base) == len(adapted) == len(NOVEL_INSTRUCTIONS)
    assert out.index("--- base model") < out.index("--- with the adapter")
    assert base != adapted  # randomize_lora makes the adapter change the model

    assert main([*TINY_RUN, "--novel"]) == 0  # no adapter: the base model's answers only
    out = capsys.readouterr().out
    assert out.startswith("no --adapter given: the base model's answers only\n")
    assert novel_answers(out, "base model") == base and "with the adapter" not in out


def test_novel_answers_do_not_depend_on_the_batch_size(tmp_path, capsys):
    adapter = tiny_adapter(tmp_path / "adapter")
    outputs = []
    for batch_size in ("1", "2", str(len(NOVEL_INSTRUCTIONS))):  # one at a time, ragged batches, one batch
        assert main([*TINY_RUN, "--novel", "--adapter", str(adapter), "--temperature", "0", "--batch-size",
                     batch_size]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] == outputs[2]


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_precision_holds_the_model_and_its_adapter_in_that_dtype(tmp_path, precision, dtype):
    adapter = tiny_adapter(tmp_path / "adapter")
    args = Namespace(model="tiny-llama", adapter=str(adapter), precision=precision)
    model, _ = load_model_and_adapter(args)
    assert {parameter.dtype for parameter in model.parameters()} == {dtype}


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda folder: tiny_adapter(folder, hidden_size=32), "has shape (8, 32) but the model needs (8, 64)"),
        (lambda folder: folder.mkdir(), "adapter_config.json: no such file"),
    ],
)
def test_adapter_that_does_not_fit_the_model_is_one_line_exit_2(tmp_path, capsys, make, message):
    make(tmp_path / "adapter")
    assert main([*TINY_RUN, "--prompt", "Hello", "--adapter", str(tmp_path / "adapter")]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.err.count("\n") == 1 and captured.out == ""


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "no-such-model"], "no-such-model: not a model folder"),
        (["--temperature=-1"], "temperature must be >= 0"),
        (["--top-p", "0"], r"top_p must be in (0, 1]"),
        (["--max-new-tokens", "0"], "max_new_tokens must be an integer >= 1"),
    ],
)
def test_bad_model_or_setting_is_one_line_exit_2(capsys, argv, message):
    assert main([*TINY_RUN, "--prompt", "Hello", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_prompt_or_novel_is_required(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--model", "tiny-llama"])
    assert exit.value.code == 2
    assert "one of the arguments --prompt --novel is required" in capsys.readouterr().err


# --- The embedded model ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_greedy_equals_transformers_generate_on_the_embedded_model(embedded_base):
    tokenizer = load_tokenizer()
    text = format_prompt(tokenizer, "What is the capital of France?")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    ours = generate(embedded_base, ids, max_new_tokens=32, eos_token_id=tokenizer.eos_token_id)
    theirs = embedded_base.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=32,
                                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    assert_close(ours, theirs[:, ids.shape[1]:], **EXACT)
    assert "Paris" in tokenizer.decode(ours[0])


@pytest.mark.parametrize("training", [True, False])
def test_generate_leaves_the_callers_train_or_eval_mode(tiny, training):
    tiny.train(training)
    generate(tiny, token_batch(tiny, batch=1, length=4), max_new_tokens=2)
    assert tiny.training is training and all(module.training is training for module in tiny.modules())


def test_top_p_among_the_most_probable_candidates_samples_the_full_nucleus_distribution():
    # A peaked distribution over 1,000 tokens, as a language model's next digit: the nucleus lies
    # among the 64 candidates, and draws from it follow the full path's filtered probabilities.
    logits = (random_logits(batch=1, vocab=1000, scale=1.0) + 12.0 * (torch.arange(1000) < 5)).repeat(40_000, 1)
    ids = sample_from_nucleus_candidates(apply_temperature(logits, 0.7), 0.9, torch.Generator().manual_seed(0))
    expected = top_p_filter(apply_temperature(logits[:1], 0.7), 0.9).softmax(-1)[0]
    frequencies = torch.bincount(ids, minlength=1000) / len(ids)
    assert_close(frequencies, expected, rtol=0, atol=0.01)  # four binomial standard errors at 40,000 draws


def test_a_nucleus_wider_than_the_candidates_takes_the_full_path():
    flat = random_logits(batch=4, vocab=1000, scale=0.1)  # nearly uniform: 0.9 of it needs ~900 tokens
    assert sample_from_nucleus_candidates(flat, 0.9) is None
    ids = sample_next_token(flat, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(0))
    allowed = top_p_filter(flat, 0.9) > -math.inf
    assert allowed.gather(-1, ids[:, None]).all()
