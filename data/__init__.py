"""The data LoRA trains on: simulated predator-prey series written as LLMTIME text, Alpaca-style
instructions with the prompt masked out of the loss, windows, batches, and each task's split.

Read in this order: ``lotka_volterra`` (the series), ``llmtime`` (series as text), ``sequences``
(windows of tokens), ``instructions``, ``template``, ``tokenization``, ``split``,
``generated_tasks`` (instruction tuning), ``collate`` (batches), ``tasks`` (what each task uses).
"""
