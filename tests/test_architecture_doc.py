"""docs/architecture.md's extension examples run as written (the page cannot drift from the code)."""

from __future__ import annotations

import re

import torch

from dtrak_core.paths import REPO_ROOT

DOC = REPO_ROOT / "docs" / "architecture.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_every_extension_example_runs_and_its_assertions_hold():
    blocks = python_blocks(DOC.read_text())
    assert len(blocks) == 5, "one example per extension point: family, output function, computer, projector, scorer"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    namespace: dict = {"__name__": "architecture_doc"}
    registries = _registries()
    before = {name: set(registry.names()) for name, registry in registries.items()}
    try:
        for block in blocks:  # in order: later examples reuse the task and images of the first
            exec(compile(block, str(DOC), "exec"), namespace)
        added = {name: set(registry.names()) - before[name] for name, registry in registries.items()}
        assert all(added.values()), f"every example registers a new piece: {added}"
    finally:
        torch.set_num_threads(threads)
        for name, registry in registries.items():  # leave the registries as the library made them
            for entry in set(registry.names()) - before[name]:
                registry.unregister(entry)


def _registries() -> dict:
    from dtrak_core.attribution.feature_computers import FEATURE_COMPUTERS
    from dtrak_core.attribution.methods import METHODS
    from dtrak_core.attribution.output_functions import OUTPUT_FUNCTIONS
    from dtrak_core.attribution.projectors import PROJECTORS
    from dtrak_core.attribution.scorers import SCORERS
    from dtrak_core.tasks import TASKS

    return {"tasks": TASKS, "output functions": OUTPUT_FUNCTIONS, "computers": FEATURE_COMPUTERS,
            "projectors": PROJECTORS, "scorers": SCORERS, "methods": METHODS}
