"""The documentation site: every Python snippet of its pages runs, and the strict MkDocs build passes offline
(and fails on a broken cross-reference)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# A ```python block runs unless the line before it is this comment (for code that needs a GPU or the hub).
NOT_RUN = "<!-- not run -->"
# README blocks use the reader's own `model`, `loader`, ...: the line before such a block names the
# README_SETUP entries that define them (an HTML comment, invisible on the rendered page).
SETUP = re.compile(r"<!-- setup: ([\w ]+) -->")
FENCE = re.compile(r"^```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)
# Pages whose snippets need an optional extra (`trl`, which `make test` installs) are skipped without it.
NEEDS = {"guides/trl.md": ("trl",)}


def snippets(page: Path) -> list[tuple[int, list[str], str]]:
    """``(line number, setup names, code)`` of the page's runnable ``python`` blocks, in order."""
    text = page.read_text()
    found = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
        if before != NOT_RUN:
            setup = SETUP.fullmatch(before)
            found.append((text.count("\n", 0, match.start()) + 2, setup[1].split() if setup else [], match[1]))
    return found


PAGES = sorted(page for page in DOCS.rglob("*.md") if snippets(page))


def test_the_guides_have_snippets():
    assert {page.relative_to(DOCS).as_posix() for page in PAGES} >= {
        "getting-started.md",
        "guides/pytorch.md",
        "guides/trainer.md",
        "guides/accelerate.md",
        "guides/peft.md",
        "guides/probe.md",
        "guides/faults.md",
        "guides/fault_training.md",
        "guides/trl.md",
    }


@pytest.mark.parametrize("page", PAGES, ids=[page.relative_to(DOCS).as_posix() for page in PAGES])
def test_page_snippets_run_in_order(page, tmp_path, monkeypatch):
    for module in NEEDS.get(page.relative_to(DOCS).as_posix(), ()):
        pytest.importorskip(module)
    monkeypatch.chdir(tmp_path)  # files the snippets write land here
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for line, setup, code in snippets(page):
        assert not setup, f"{page}:{line}: the guides define what their snippets use"
        exec(compile(code, f"{page}:{line}", "exec"), namespace)  # noqa: S102 (the page's own code)


# What a README reader brings: a classifier and its loader, a tiny GPT-2 with batches, Trainer arguments
# and a dataset, an accelerate set-up.
README_SETUP = {
    "classifier": """
import torch
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
loader = [(torch.randn(4, 8), torch.randint(3, (4,))) for _ in range(3)]
loss_fn = torch.nn.CrossEntropyLoss()
x, y = loader[0]
""",
    "lm": """
import torch
from transformers import GPT2Config, GPT2LMHeadModel
torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=32, vocab_size=64))
ids = torch.randint(64, (6, 16))
batches = [{"input_ids": ids[i : i + 2], "labels": ids[i : i + 2]} for i in range(0, 6, 2)]
delta = torch.full_like(model.lm_head.weight, 1e-3)
""",
    "trainer": """
from transformers import Trainer, TrainingArguments
args = TrainingArguments("trainer", max_steps=2, per_device_train_batch_size=2, report_to=[], use_cpu=True)
ds = [{"input_ids": row, "labels": row} for row in ids]
""",
    "accelerate": """
import contextlib
from accelerate import Accelerator
from acr_optim import ACR
accelerator = Accelerator(cpu=True)
acr = ACR(torch.optim.AdamW(model.parameters(), lr=1e-3), eps=0.1)
model, optimizer = accelerator.prepare(model, acr)
batch, step_batches = batches[0], []
""",
}
README = ROOT / "README.md"


def test_readme_snippets_run_in_order(tmp_path, monkeypatch):
    pytest.importorskip("peft")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme"}
    blocks = snippets(README)
    assert len(blocks) >= 7 and all(name in README_SETUP for _, setup, _ in blocks for name in setup)
    for line, setup, code in blocks:
        for name in setup:
            exec(README_SETUP[name], namespace)  # noqa: S102
        exec(compile(code, f"{README}:{line}", "exec"), namespace)  # noqa: S102 (the README's own code)


def _mkdocs() -> None:
    """Skip without the ``docs`` extra, except in CI (``CI=true``), where the site must build."""
    if not os.environ.get("CI"):
        pytest.importorskip("mkdocs")
        pytest.importorskip("mkdocstrings_handlers.python")


def _build(config: Path, site: Path) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "mkdocs",
        "build",
        "--strict",
        "--config-file",
        str(config),
        "--site-dir",
        str(site),
    ]
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run(command, check=False, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)


def test_site_builds_in_strict_mode(tmp_path):
    _mkdocs()
    build = _build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert build.returncode == 0, build.stderr[-4000:]
    assert (tmp_path / "site" / "reference" / "optimizer" / "index.html").read_text().count("perturbed") > 0


def test_strict_build_fails_on_a_broken_cross_reference(tmp_path):
    _mkdocs()
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "index.md").write_text("[ACR][acr_optim.ACR] and [acr_optim.ACRx][]\n\n::: acr_optim.ACR\n")
    config = tmp_path / "mkdocs.yml"
    plugins = (
        f"plugins:\n  - autorefs\n  - mkdocstrings:\n      handlers:\n        python:\n          paths: [{ROOT}]\n"
    )
    config.write_text(f"site_name: t\ndocs_dir: {tmp_path / 'docs'}\n{plugins}")
    build = _build(config, tmp_path / "site")
    assert build.returncode == 1
    assert "Could not find cross-reference target 'acr_optim.ACRx'" in build.stderr
    assert "acr_optim.ACR'" not in build.stderr.replace("acr_optim.ACRx'", "")
