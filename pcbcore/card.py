"""The model card written with a merge: which models, method and parameters produced it."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from pcbcore.config import MergeConfig


def model_card(config: MergeConfig) -> str:
    """A Hugging Face model card saying which models, method and parameters produced the merge."""
    desc = config.describe()
    lines = [
        "---",
        yaml.safe_dump(
            {"base_model": config.base_model, "tags": ["merge", "pcbmerge", config.method_name], "library_name": "transformers"}, sort_keys=False
        ).strip(),
        "---",
        "",
        f"# Merged model ({config.method_name})",
        "",
        f"Produced by [pcbmerge](https://github.com/) with merge method `{config.method_name}` from base model `{config.base_model}`.",
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
        "The full configuration is in `pcbmerge_config.yml`.",
        "",
    ]
    return "\n".join(lines)


def write_model_card(config: MergeConfig, folder: Path, config_text: str | None = None) -> None:
    """Write the card (README.md) and the configuration it points to (pcbmerge_config.yml) into `folder`:
    `config_text` as given (the user's own file), else the validated configuration."""
    (folder / "pcbmerge_config.yml").write_text(config_text or yaml.safe_dump(config.describe(), sort_keys=False))
    (folder / "README.md").write_text(model_card(config))
