"""The model card written with a merge: which models, method and parameters produced it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from pcbcore.config import MergeConfig

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def model_card(config: MergeConfig) -> str:
    """A Hugging Face model card saying which models, method and parameters produced the merge."""
    desc = config.describe()
    metadata = {"tags": ["merge", "pcbmerge", config.method_name], "library_name": "transformers"}
    if hub_id(config.base_model):  # the Hub reads base_model as a repo id: a local folder would be a broken link
        metadata = {"base_model": config.base_model, **metadata}
    base = f" from base model `{Path(config.base_model).name if not hub_id(config.base_model) else config.base_model}`" if config.base_model else ""
    lines = [
        "---",
        yaml.safe_dump(metadata, sort_keys=False).strip(),
        "---",
        "",
        f"# Merged model ({config.method_name})",
        "",
        f"Produced by pcbmerge with merge method `{config.method_name}`{base}.",
        "",
        "## Models merged",
        "",
        "| model | parameters |",
        "|---|---|",
        *[f"| `{m['model']}` | `{json.dumps(m['parameters'])}` |" for m in desc["models"]],
        "",
        "## Method parameters",
        "",
        "```yaml",
        yaml.safe_dump(desc["parameters"], sort_keys=False).strip(),
        "```",
        "",
        *_vocabulary_lines(config),
        "The full configuration is in `pcbmerge_config.yml`.",
        "",
    ]
    return "\n".join(lines)


def hub_id(ref: str) -> bool:
    """Whether a reference names a Hub repo (`org/name`, optionally `@revision`) rather than a local folder."""
    return bool(HUB_ID.match(ref)) and not Path(ref).expanduser().exists()


def _vocabulary_lines(config: MergeConfig) -> list[str]:
    """The card's word on the tokenizer: the vocabulary built (if any) and the chat template asked for."""
    lines = []
    if config.vocabulary is not None:
        added = ", ".join(f"`{token}`" for token, _ in config.vocabulary.tokens)
        lines.append(f"Vocabulary: `{config.vocabulary.source}`" + (f", with tokens {added}" if added else "") + "; embeddings permuted into it.")
    if config.chat_template is not None:
        lines.append("Chat template: " + ("chosen from the models (`auto`)." if config.chat_template == "auto" else "set by the configuration."))
    return [*lines, ""] if lines else []


def write_model_card(config: MergeConfig, folder: Path, config_text: str | None = None) -> None:
    """Write the card (README.md) and the configuration it points to (pcbmerge_config.yml) into `folder`:
    `config_text` as given (the user's own file), else the validated configuration."""
    (folder / "pcbmerge_config.yml").write_text(config_text or yaml.safe_dump(config.describe(), sort_keys=False))
    (folder / "README.md").write_text(model_card(config))
