"""Training: the raw PyTorch loop (`python -m training.loop`), its settings, schedule and checkpoints.

Read in this order: ``loop`` (the run, top to bottom in numbered steps: seed; load; inject; AdamW
over A and B; per step: learning rate, accumulated forward and backward, clipping, step, log,
validate, checkpoint), ``config`` (every setting, a dataclass the command line is generated from,
checked once by ``TrainConfig.validate``), ``schedule`` (``get_lr``: linear warm-up, cosine decay),
``checkpoint`` (one safetensors file, exact resume), ``distributed`` (the same loop under torchrun),
``plot`` (``loss.png``). How a step computes: the frozen base held in the compute dtype
(``models.precision``), A and B in float32, the loss a chunk of tokens at a time (``models.loss``),
every labelled token weighed the same across micro-batches (``loop.accumulate_gradients``).

The main job, ``python -m training.loop`` with no arguments: LoRA (r = 8, alpha = 16, on every
``q_proj`` and ``v_proj``) of the embedded SmolLM2-135M-Instruct on LLMTIME text of 800 simulated
Lotka-Volterra systems, validated on 100 held-out systems, written to
``runs/llmtime-<date>-<time>/``: ``config.json``, ``metrics.jsonl``, ``loss.png``,
``checkpoint.safetensors`` (with the one before it, ``checkpoint.previous.safetensors``) and
``adapter/`` (peft's format). Its measured runs are in ``results/README.md``.

``python -m training.loop --help`` lists every setting with its default and a line of advice.
What the settings a user reaches for first do:

- ``--task instruct`` trains on the embedded generated instruction tasks (or ``--data`` an Alpaca
  ``.json``/``.jsonl``; a record without ``input``, or with ``null``, reads as an empty one), with
  the prompt masked out of the loss.
- ``--quantize nf4`` (with ``--double-quant``) holds the frozen base in 4 bits, as QLoRA does
  (``lora/nf4.py``; ``tutorials/09_qlora_nf4.md``).
- LoRA's relatives are flags, each proven equal to peft's (``tests/test_rslora.py``,
  ``test_dora.py``, ``test_pissa.py``, ``test_loraplus.py``, ``test_lora_embedding.py``, against
  peft 0.21.2, pinned in the test extra): ``--use-rslora`` (scaling alpha / sqrt(r)),
  ``--use-dora``, ``--init pissa`` (the adapter is saved converted for the original base),
  ``--loraplus-ratio 16``, and ``--targets embed_tokens,q_proj,v_proj`` for LoRA on the embedding.
- ``--lora-path fused`` takes the hand-written backward of ``lora/fused.py``; the default is the
  layer's one-line formula.
- ``--noise 0.05`` trains on the simulated series observed with 5% multiplicative log-normal
  noise (``data/lotka_volterra.py``: seeded, the clean series kept beside).
- ``--config run.json`` reads settings from a file (a run's own ``config.json`` repeats it), and
  flags override it.
- ``--resume runs/NAME`` continues a run from its last checkpoint, exactly: a run killed with
  SIGKILL and resumed ends with the same adapter as one never interrupted (``tests/test_loop.py``).
  When the newest checkpoint is unreadable (cut short by a disk fault, say), ``--resume`` goes
  back to the previous one with a one-line warning naming the file and the step.

Bad input (unknown model, missing data file, ``--max-length 1``, ``--batch-size 0``, ``--lr 0``,
an unknown flag) is a one-line error with exit status 2 and nothing written; a NaN or infinite
loss stops the run, names the step and keeps the last good checkpoint.
"""
