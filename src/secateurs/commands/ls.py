"""``secateurs ls``: what is registered (criteria, architectures, datasets, model aliases)."""

from __future__ import annotations

import argparse

from secateurs.commands.base import Command, register


@register
class List(Command):
    path = ("ls",)
    help = "list criteria, architectures, datasets and model aliases"

    def run(self, args: argparse.Namespace) -> int:
        # Registry tables and light modules only: listing must not import torch (seconds).
        from secateurs.adapters import ARCHITECTURES
        from secateurs.criteria import CRITERIA
        from secateurs.data import DATASETS
        from secateurs.evaluate.zeroshot import TASKS
        from secateurs.export import EXPORTS
        from secateurs.models import ALIASES

        print("criteria (append '+' to protect Shortened LLaMA's blocks 0-3 and the last 2):")
        for name, info in CRITERIA.catalog():
            print(f"  {name:<18} [{','.join(sorted(info['units']))}] {info['summary']}")
        print("architectures (adapter: model types [prunable units]):")
        for name, info in ARCHITECTURES.catalog():
            units = ",".join(info["unit_kinds"])
            print(f"  {name:<18} {', '.join(info['model_types'])} [{units}]")
        print("datasets (perplexity):")
        for name, dataset in DATASETS.items():
            print(f"  {name:<18} {dataset.description} [{dataset.default_split}]")
        print("zero-shot tasks (lm-evaluation-harness; metric as in the papers):")
        for name, task in TASKS.items():
            print(f"  {name:<18} {task.metric}")
        print(
            "export formats (secateurs export --to FORMAT; prune --target keeps them expressible):"
        )
        for name, fmt in EXPORTS.items():
            print(f"  {name:<18} {fmt.summary}; loads in: {', '.join(fmt.engines)}")
        print("model aliases:")
        for name, alias in ALIASES.items():
            print(f"  {name:<18} {alias.filename} from PyPI {alias.install.split()[-1]}")
        return 0
