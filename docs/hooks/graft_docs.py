"""MkDocs hooks (mkdocs.yml `hooks:`): generated pages and the committed plots.

- ``<!-- params-reference -->`` in a page becomes the reference of every ``params.yaml`` key,
  rendered from graft.config's pydantic models (graft.params_reference), so it cannot drift.
- ``<!-- cli-reference -->`` becomes the ``--help`` of every ``graft`` sub-command.
- The PNGs under ``plots/`` (DVC plots committed to git) are added to the site at ``plots/``,
  so pages can show them and ``mkdocs build --strict`` checks that they exist.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File

from graft.cli import app
from graft.cli_reference import cli_reference_markdown
from graft.params_reference import params_reference_markdown

GENERATED = {
    "<!-- params-reference -->": params_reference_markdown,
    "<!-- cli-reference -->": lambda: cli_reference_markdown(app),
}


def on_files(files, config):
    root = Path(config.config_file_path).parent
    for image in sorted((root / "plots").rglob("*.png")):
        files.append(
            File(
                image.relative_to(root).as_posix(),
                src_dir=str(root),
                dest_dir=config.site_dir,
                use_directory_urls=config.use_directory_urls,
            )
        )
    return files


def on_page_markdown(markdown, page, config, files):
    for marker, render in GENERATED.items():
        if marker in markdown:
            markdown = markdown.replace(marker, render())
    return markdown
