"""MkDocs hook: a link from a page to a repository file outside ``docs/`` (``[`experiments/`](../experiments)``,
right on GitHub) has no target on the site, so the site shows its text without the link."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

LINK = re.compile(r"(?<!!)\[(?P<text>[^\]]+)\]\((?P<target>[^)\s]+)\)")


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    docs = Path(config["docs_dir"]).resolve()
    folder = (docs / page.file.src_path).parent

    def unlink(match: re.Match[str]) -> str:
        target = match["target"]
        if "://" in target or target.startswith(("#", "mailto:")):
            return match[0]
        resolved = (folder / target.split("#")[0]).resolve()
        return match["text"] if not resolved.is_relative_to(docs) else match[0]

    return LINK.sub(unlink, markdown)
