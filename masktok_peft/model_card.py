"""The masktok section of an adapter folder's model card (README.md).

PEFT writes the card's metadata (library_name, base_model, tags) before it saves the adapter
config; this module then adds the masktok tags and one section between marker comments. Text
outside the markers, including anything the user wrote, is kept as it is.
"""

from __future__ import annotations

import os

from huggingface_hub import ModelCard, ModelCardData

SECTION_START = "<!-- masktok:start -->"
SECTION_END = "<!-- masktok:end -->"
CARD_TAGS = ("masktok", "multi-token-prediction", "peft")


def _section_text(config) -> str:
    base = config.base_model_name_or_path or "BASE_MODEL"
    return f"""{SECTION_START}
## masktok adapter

This is a [masktok-peft](https://pypi.org/project/masktok-peft/) adapter: LoRA weights plus one
trainable mask-token embedding row, trained so that `{base}` proposes several tokens per forward
pass. It loads onto the unmodified base model.

| setting | value |
| --- | --- |
| base model | `{base}` |
| mask token id | {config.mask_token_id} |
| gated (LoRA only at mask positions) | {config.gated} |
| max tokens per pass (`max_k`) | {config.max_k} |
| ConfAdapt threshold | {config.threshold} |

Loading needs the masktok-peft package; without it PEFT stops with an error that names it.

```python
import masktok_peft  # registers the adapter type with PEFT
from peft import AutoPeftModelForCausalLM
from transformers import AutoTokenizer

model = AutoPeftModelForCausalLM.from_pretrained("ADAPTER_ID_OR_FOLDER")
tokenizer = AutoTokenizer.from_pretrained("{base}")
inputs = tokenizer("Question: what is 12 * 7?", return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=64, return_dict_in_generate=True)
print(tokenizer.decode(output.sequences[0]), output.masktok_stats["tokens_per_pass"])
```
{SECTION_END}"""


def write_model_card_section(save_directory: str, config) -> None:
    """Add the masktok tags and section to `save_directory`/README.md, creating the card if needed."""
    path = os.path.join(save_directory, "README.md")
    card = ModelCard.load(path) if os.path.exists(path) else ModelCard.from_template(ModelCardData())
    card.data["library_name"] = "peft"
    if config.base_model_name_or_path and not card.data.get("base_model"):
        card.data["base_model"] = config.base_model_name_or_path
    card.data["tags"] = sorted(set(card.data.get("tags") or []) | set(CARD_TAGS))

    section = _section_text(config)
    text = card.text
    if SECTION_START in text and SECTION_END in text:
        before, rest = text.split(SECTION_START, 1)
        after = rest.split(SECTION_END, 1)[1]
        text = before + section + after
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    card.text = text
    card.save(path)
