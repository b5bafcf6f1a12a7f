"""The prompt template: how an instruction record becomes the text the model is trained on.

The model is trained on one text per record, the prompt followed by the answer and EOS::

    ### Instruction:
    Reverse the letters of the word.

    ### Input:
    planet

    ### Response:
    tenalp<eos>

When ``input`` is empty the ``### Input:`` block is left out, as Alpaca does. (Alpaca also
starts every prompt with a one-sentence preamble, "Below is an instruction that describes a
task..."; it carries no information about the task, so this project leaves it out.)
"""

TEMPLATE_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
TEMPLATE_WITHOUT_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"


def format_prompt(example: dict) -> str:
    """The prompt of ``example``: the Alpaca template up to and including ``### Response:\\n``.

    The Input block is left out when ``example["input"]`` is the empty string, null or missing
    (``load_instructions`` reads the last two as ``""``; a record built in code may have either).
    """
    text = example.get("input") or ""
    template = TEMPLATE_WITH_INPUT if text else TEMPLATE_WITHOUT_INPUT
    return template.format(instruction=example["instruction"], input=text)
